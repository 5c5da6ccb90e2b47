"""Off the production path: the Ollama simulator, the private redis-server, the running-service harness."""
