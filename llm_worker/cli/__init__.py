"""The command line: `llm-worker run | submit | queues | models | plugins | check-config | simulate` (main.py)."""
