"""What producers, workers and the Lua scripts agree on: jobs, requests, results, error kinds, event names."""
