"""Settings: every setting declared once (config.py), and the Redis URL built from its section (urls.py)."""
