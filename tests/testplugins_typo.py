"""A plugin with a misspelled hook: start-up must refuse it, naming it."""

from llm_worker import hookimpl


@hookimpl
def llm_worker_recrod(event):  # type: ignore[no-untyped-def]
    pass
