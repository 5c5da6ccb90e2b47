"""The chaos drill's parts; scripts/chaos.py runs them (see its docstring)."""
