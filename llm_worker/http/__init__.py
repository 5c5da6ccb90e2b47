"""The HTTP process: the WSGI app (health, readiness, metrics, status, admin) and the sampler thread that probes."""
