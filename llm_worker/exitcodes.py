"""Exit codes: the contract between a child process and the supervisor.

A worker that exits with WORKER_BOOT_ERROR could not start (bad settings,
Redis refusing its credentials, a plugin that does not load); respawning it
would only spin, so after a few in a row the supervisor stops with the
worker's message instead. A worker Redis refuses while it runs (credentials
revoked) exits with it too: the job in hand is handed back, not counted as a crash.
"""

OK = 0
SUPERVISOR_ERROR = 1  # the supervisor itself failed (its loop raised: Arbiter.halt), or a child raised unhandled
USAGE = 2  # bad command line or settings (`llm-worker run`, `check-config`)
WORKER_BOOT_ERROR = 3
WORKER_QUIT = 4  # told to stop at once (QUIT); its jobs are handed back uncounted
