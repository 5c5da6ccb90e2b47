"""The loop one worker process runs, job by job, and what it needs to run them."""

from llm_worker.workerproc.process import WorkerSpec, run_worker

__all__ = ["WorkerSpec", "run_worker"]
