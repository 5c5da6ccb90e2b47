"""How Python calls the queue's Lua scripts (lua/): each one's KEYS and ARGV, in order.

Each script names its KEYS and ARGV once, at its top (``local processing =
KEYS[1]``). The named tuples here list the same names in the same order
(tests/test_queue.py checks that they agree), and callers fill them by name,
so the order is written once on each side. A last ARGV field that is a tuple
is the rest of ARGV (``{unpack(ARGV, n)}`` in the script).

Every script runs with lua/json.lua before it (its line numbers in Redis's
errors count from there). Flags travel as "1" or "0": Redis takes no booleans.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, NamedTuple

import redis

PRELUDE = "json"


def source(name: str) -> str:
    """The text of lua/<name>.lua."""
    return resources.files("llm_worker.queue").joinpath(f"lua/{name}.lua").read_text()


def flag(value: bool) -> str:
    """A flag as a script reads it (``ARGV[n] == '1'``)."""
    return "1" if value else "0"


class Script:
    """One script of lua/, registered on a client; called with its KEYS and ARGV tuples."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self._script = client.register_script(source(PRELUDE) + source(name))

    def __call__(self, keys: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        argv = list(args)
        if argv and isinstance(argv[-1], tuple):
            argv[-1:] = argv[-1]
        return self._script(keys=list(keys), args=argv)


# ---- finish.lua: end a job a worker holds, fenced ------------------------------


class FinishKeys(NamedTuple):
    processing: str
    result_key: str
    done_key: str
    target: str  # the processing list again when there is no target operation
    crashes: str
    stream: str
    queue: str  # the processing list again when no next job is taken
    stats: str
    trimmed: str  # the counter of dead letters trimmed


class FinishArgs(NamedTuple):
    payload: bytes
    result_json: bytes | str  # "" for none
    done_status: str
    ttl: int
    target_op: str
    target_member: bytes | str
    target_score: int
    stream_maxlen: int
    take_next: str
    counted: str
    keep: int  # QUEUE_REMOVE_ON_FAIL when target is the dead-letter list, else 0
    stream_end: tuple[str, ...]  # the rest of ARGV


# ---- recover.lua: hand back a gone worker's jobs ---------------------------------


class RecoverKeys(NamedTuple):
    processing: str
    queue: str
    dead_letter: str
    events: str
    heartbeat: str
    registry: str
    stats: str
    trimmed: str


class RecoverArgs(NamedTuple):
    count_crash: str
    max_crashes: int
    only_if_expired: str
    worker_id: str
    max_job_bytes: int
    raw_keep: int
    result_prefix: str
    done_prefix: str
    crashes_prefix: str
    result_ttl: int
    crash_counter_ttl: int
    events_maxlen: int
    done_status: str
    counted: str
    reason_format: str
    result_template: bytes
    entry_template: bytes
    raw_entry_template: bytes
    event_template: bytes
    failed_event: str
    dead_lettered_event: str
    keep: int


# ---- promote.lua: move due retries back to their queues --------------------------


class PromoteKeys(NamedTuple):
    delayed: str
    dead_letter: str
    trimmed: str


class PromoteArgs(NamedTuple):
    now_ms: int
    most: int
    raw_keep: int
    entry_template: bytes
    keep: int


# ---- requeue.lua: move a dead letter back to its queue (admin.py) -----------------


class RequeueKeys(NamedTuple):
    dead_letter: str
    queue: str
    result_key: str
    done_key: str
    crashes: str


class RequeueArgs(NamedTuple):
    entry: bytes
    payload: bytes


# ---- park.lua, pick.lua, claim.lua: model affinity (parking.py) ------------------


class ParkKeys(NamedTuple):
    processing: str
    parked: str
    index: str


class ParkArgs(NamedTuple):
    payload: bytes
    model: str


class PickKeys(NamedTuple):
    processing: str
    index: str


class PickArgs(NamedTuple):
    parked_prefix: str
    claim_prefix: str
    max_wait_ms: int
    host: str
    claim_ms: int
    cold: str
    hot_count: int
    models: tuple[str, ...]  # the rest of ARGV: hot models, then those other hosts hold


class ClaimKeys(NamedTuple):
    claim: str


class ClaimArgs(NamedTuple):
    host: str
    claim_ms: int


class UnparkKeys(NamedTuple):
    index: str
    queue: str


class UnparkArgs(NamedTuple):
    parked_prefix: str
    most: int


SIGNATURES: dict[str, tuple[type[tuple[Any, ...]], type[tuple[Any, ...]]]] = {
    "finish": (FinishKeys, FinishArgs),
    "recover": (RecoverKeys, RecoverArgs),
    "promote": (PromoteKeys, PromoteArgs),
    "requeue": (RequeueKeys, RequeueArgs),
    "park": (ParkKeys, ParkArgs),
    "pick": (PickKeys, PickArgs),
    "claim": (ClaimKeys, ClaimArgs),
    "unpark": (UnparkKeys, UnparkArgs),
}
