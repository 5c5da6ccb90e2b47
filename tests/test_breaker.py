"""Circuit breakers in shared memory, exercised by real forked processes and real signals."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import urllib3

from llm_worker.devtools.simulator import Simulator
from llm_worker.host.breaker import COUNTED, BreakerOpen, Breakers
from llm_worker.host.layout import MAX_BREAKERS
from llm_worker.host.shm import SharedState
from llm_worker.plugin.providers import ProviderError
from llm_worker.protocol.jobs import ErrorKind, JobError
from llm_worker.settings.config import load

FAIL = ProviderError("HTTP 500", ErrorKind.PROVIDER, status=500)
CTX = multiprocessing.get_context("fork")


def breakers(state: SharedState, **env: str) -> Breakers:
    settings = load(
        {
            "CIRCUIT_BREAKER_THRESHOLD": "3",
            "CIRCUIT_BREAKER_RESET_TIMEOUT": "200",
            "CIRCUIT_BREAKER_MAX_RESET_TIMEOUT": "400",
            **env,
        }
    ).settings
    return Breakers(state.breakers, state.lock, settings)


def trip(b: Breakers, model: str = "m") -> None:
    for _ in range(3):
        b.record(b.admit("ollama", model, 5), FAIL)


def state_of(b: Breakers, key: str = "ollama:m") -> str:
    """A breaker's state; one without a row (nothing counted yet) is closed."""
    return next((row["state"] for row in b.rows() if row["key"] == key), "closed")


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_which_errors_count_is_the_documented_table(kind: ErrorKind) -> None:
    counts = kind in (ErrorKind.TIMEOUT, ErrorKind.NETWORK, ErrorKind.PROVIDER)
    assert (kind in COUNTED) is counts
    b = breakers(SharedState(4))
    for _ in range(3):
        b.record(b.admit("ollama", "m", 5), JobError("x", kind))
    assert state_of(b) == ("open" if counts else "closed")


def test_threshold_consecutive_failures_trip_and_a_success_resets_the_count() -> None:
    b = breakers(SharedState(4))
    for _ in range(2):
        b.record(b.admit("ollama", "m", 5), FAIL)
    b.record(b.admit("ollama", "m", 5), None)
    for _ in range(2):
        b.record(b.admit("ollama", "m", 5), FAIL)
    assert state_of(b) == "closed"
    b.record(b.admit("ollama", "m", 5), FAIL)
    assert state_of(b) == "open" and [t.to for t in b.transitions] == ["opened"]
    with pytest.raises(BreakerOpen) as refused:
        b.admit("ollama", "m", 5)
    assert refused.value.retryable and refused.value.retry_at > time.monotonic()


def test_a_failure_rate_over_the_window_trips_without_consecutive_failures() -> None:
    b = breakers(
        SharedState(4),
        CIRCUIT_BREAKER_THRESHOLD="1000",
        CIRCUIT_BREAKER_MIN_CALLS="10",
        CIRCUIT_BREAKER_FAILURE_RATE="0.5",
    )
    for n in range(10):
        b.record(b.admit("ollama", "m", 5), FAIL if n % 2 else None)
    assert state_of(b) == "open"
    assert "5 of 10 calls failed" in b.transitions[-1].reason


def test_half_open_probe_success_closes_failure_reopens_with_a_longer_wait() -> None:
    b = breakers(SharedState(4))
    trip(b)
    first_wait = b.transitions[-1].open_seconds
    time.sleep(first_wait + 0.05)
    probe = b.admit("ollama", "m", 5)
    assert probe.probe and state_of(b) == "half_open"
    b.record(probe, FAIL)
    assert state_of(b) == "open" and b.transitions[-1].open_seconds > first_wait  # doubled, with jitter
    time.sleep(b.transitions[-1].open_seconds + 0.05)
    probe = b.admit("ollama", "m", 5)
    b.record(probe, None)
    assert state_of(b) == "closed"
    assert [t.to for t in b.transitions] == ["opened", "half_open", "opened", "half_open", "closed"]


def test_the_open_wait_doubles_on_each_reopen_up_to_its_cap_never_shorter_at_most_a_fifth_longer() -> None:
    b = breakers(SharedState(4), CIRCUIT_BREAKER_RESET_TIMEOUT="100", CIRCUIT_BREAKER_MAX_RESET_TIMEOUT="250")
    trip(b)
    waits = [b.transitions[-1].open_seconds]
    for _ in range(2):  # the probe fails: open again
        time.sleep(waits[-1] + 0.02)
        b.record(b.admit("ollama", "m", 5), FAIL)
        waits.append(b.transitions[-1].open_seconds)
    for wait, expected in zip(waits, (0.1, 0.2, 0.25)):
        assert expected <= wait <= expected * 1.2 + 1e-9, waits


def test_off_with_enable_circuit_breaker_false() -> None:
    b = breakers(SharedState(4), ENABLE_CIRCUIT_BREAKER="false")
    for _ in range(10):
        b.record(b.admit("ollama", "m", 5), FAIL)
    assert b.rows() == [] and not b.refused("m", "ollama")


def test_forced_states_and_reset() -> None:
    state = SharedState(4)
    b = breakers(state)
    assert b.force("ollama:m", "force-open")
    with pytest.raises(BreakerOpen):
        b.admit("ollama", "m", 5)
    other = breakers(state)  # another process's view (a restarted worker) sees the same
    assert other.refused("m", "ollama") and other.rows()[0]["forced"] == "open"
    assert b.force("ollama:m", "force-close")
    trip(b)
    assert state_of(b) == "closed" and not b.admit("ollama", "m", 5).probe
    assert b.force("ollama:m", "reset") and b.rows()[0]["forced"] is None
    assert not b.force("ollama:nope", "reset")


def _probe_at_half_open(state: SharedState, url: str, line, out) -> None:  # type: ignore[no-untyped-def]
    b = breakers(state)
    line.wait(60)  # every process leaves the line at the same instant (a barrier: no spinning on a busy machine)
    try:
        admission = b.admit("ollama", "m", 5)
    except BreakerOpen:
        out.put("refused")
        return
    urllib3.request(
        "POST",
        url + "/api/chat",
        json={"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "probe"}]},
    )
    b.record(admission, None)
    out.put("probe" if admission.probe else "after the probe closed it")


def test_32_processes_at_the_moment_of_half_open_send_exactly_one_probe(sim: Simulator) -> None:
    # Given an open breaker whose wait is over, and a probe that takes a second
    sim.config.latency_ms = 1000
    state = SharedState(4)
    b = breakers(state)
    trip(b)
    time.sleep(b.transitions[-1].open_seconds + 0.05)
    # When 32 processes call at the same instant
    out = CTX.Queue()
    line = CTX.Barrier(32)
    procs = [CTX.Process(target=_probe_at_half_open, args=(state, sim.url, line, out)) for _ in range(32)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(out.get(timeout=5) for _ in procs)
    # Then exactly one reached the provider, and the breaker closed
    assert outcomes.count("probe") == 1 and outcomes.count("refused") == 31
    assert sim.stats().requests.get("chat") == 1
    assert state_of(b) == "closed"


def _probe_and_hang(state: SharedState, ready) -> None:  # type: ignore[no-untyped-def]
    admission = breakers(state).admit("ollama", "m", 60)
    ready.put(admission.probe)
    time.sleep(60)


def test_a_prober_sigkilled_mid_probe_leaves_the_breaker_recoverable() -> None:
    state = SharedState(4)
    b = breakers(state)
    trip(b)
    time.sleep(b.transitions[-1].open_seconds + 0.05)
    ready = CTX.Queue()
    prober = CTX.Process(target=_probe_and_hang, args=(state, ready))
    prober.start()
    assert ready.get(timeout=10) is True
    with pytest.raises(BreakerOpen):  # its lease holds while it lives
        b.admit("ollama", "m", 5)
    os.kill(prober.pid, signal.SIGKILL)
    prober.join(10)
    probe = b.admit("ollama", "m", 5)  # taken back at once, long before the lease's 60 s
    assert probe.probe
    b.record(probe, None)
    assert state_of(b) == "closed"


def _hold_the_lock(state: SharedState, ready) -> None:  # type: ignore[no-untyped-def]
    with state.lock.held():
        ready.put(True)
        time.sleep(60)


def test_a_holder_sigkilled_inside_the_lock_blocks_nobody() -> None:
    state = SharedState(4)
    b = breakers(state)
    ready = CTX.Queue()
    holder = CTX.Process(target=_hold_the_lock, args=(state, ready))
    holder.start()
    assert ready.get(timeout=10)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    started = time.monotonic()
    trip(b)  # needs the lock: the kernel released it with the dead holder
    assert state_of(b) == "open" and time.monotonic() - started < 5


NOT_FOUND = ProviderError("model 'nope' not found", ErrorKind.MODEL, status=404)


def test_a_full_table_still_guards_a_65th_model_and_recycles_closed_rows_least_recently_used_first() -> None:
    b = breakers(SharedState(4))
    for n in range(MAX_BREAKERS):
        b.record(b.admit("ollama", f"m{n}", 5), None)
    assert len(b.rows()) == MAX_BREAKERS
    # Every row was used this very second: the 65th shares the provider's catch-all row, never unguarded.
    trip(b, "m64")
    with pytest.raises(BreakerOpen) as refused:
        b.admit("ollama", "m65", 5)
    assert refused.value.key == "ollama:*" and state_of(b, "ollama:*") == "open"
    assert b.refused("m66", "ollama")
    # Once the rows idle, a closed one is recycled, the least recently used first.
    time.sleep(1.1)
    for n in range(1, MAX_BREAKERS):
        b.admit("ollama", f"m{n}", 5)
    trip(b, "m100")
    keys = {row["key"] for row in b.rows()}
    assert "ollama:m100" in keys and "ollama:m0" not in keys and "ollama:m1" in keys
    assert state_of(b, "ollama:m100") == "open"
    with pytest.raises(BreakerOpen):
        b.admit("ollama", "m100", 5)
    # The model whose row went is guarded again as a fresh, closed breaker.
    b.record(b.admit("ollama", "m0", 5), None)


def test_open_rows_are_never_recycled() -> None:
    b = breakers(SharedState(4), CIRCUIT_BREAKER_RESET_TIMEOUT="60000", CIRCUIT_BREAKER_MAX_RESET_TIMEOUT="60000")
    for n in range(MAX_BREAKERS):
        trip(b, f"m{n}")
    time.sleep(1.1)
    trip(b, "late")
    assert all(row["state"] == "open" for row in b.rows())
    assert {row["key"] for row in b.rows()} >= {f"ollama:m{n}" for n in range(MAX_BREAKERS)} | {"ollama:*"}
    with pytest.raises(BreakerOpen):
        b.admit("ollama", "another", 5)


def test_100_unknown_model_names_take_no_row_and_leave_the_table_usable() -> None:
    b = breakers(SharedState(4))
    for n in range(100):
        b.record(b.admit("ollama", f"no-such-model-{n}", 5), NOT_FOUND)
    assert b.rows() == []
    assert not b.force("ollama:no-such-model-1", "reset")
    trip(b, "m")
    assert state_of(b) == "open"
    for n in range(MAX_BREAKERS - 1):
        b.record(b.admit("ollama", f"real-{n}", 5), None)
    assert len(b.rows()) == MAX_BREAKERS and all(row["key"] != "ollama:*" for row in b.rows())
