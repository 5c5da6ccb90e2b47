"""The host in shared memory: the layout of its tables, breakers, backpressure, load board, statistics, backoff."""
