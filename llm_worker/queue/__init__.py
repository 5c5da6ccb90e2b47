"""Redis: the reliable queue and its Lua scripts, keys, streams, the response cache, administration, the client."""
