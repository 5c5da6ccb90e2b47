"""The model manager process: preload, load, unload, evict and pull (manager.py), and its choices (policy.py)."""
