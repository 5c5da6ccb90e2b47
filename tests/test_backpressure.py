"""Backpressure: the host-wide cap on provider calls, provider reachability and pool pauses.

The call gate is exercised by real forked processes sharing one region, and a
real SIGKILL; the service-level tests stop and restart the simulator and open
breakers through the admin route, with a real supervisor and workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

import pytest
import urllib3
from support import client_for, events, eventually, wait_all

from llm_worker.devtools.simulator import Simulator, SimulatorConfig
from llm_worker.host.backpressure import CallGate, ProviderDown, Reachability, in_flight, pause_reason
from llm_worker.host.breaker import Breakers
from llm_worker.host.layout import Pause
from llm_worker.host.shm import SharedState
from llm_worker.plugin.providers import Deadline, ProviderError
from llm_worker.protocol.jobs import ErrorKind, JobError
from llm_worker.protocol.records import COMPLETED, DEAD_LETTERED, FAILED
from llm_worker.settings.config import load

CTX = multiprocessing.get_context("fork")
FAIL = ProviderError("HTTP 500", ErrorKind.PROVIDER, status=500)


def host(slots: int, pools: tuple[str, ...] = ("llm-chat", "llm-priority")) -> SharedState:
    state = SharedState(slots)
    state.header.workers_wanted = slots
    for name in pools:
        state.pool_index(name)
    return state


# ---- the call gate ----------------------------------------------------------------


def _call(state: SharedState, slot: int, limit: int, hold: float, out: Any, priority_pool: int = 1) -> None:
    state.slots[slot].pid = os.getpid()
    gate = CallGate(state, slot, limit, priority_pool)
    with gate.call("m", Deadline(30)):
        with state.lock.held():
            now = in_flight(state, priority_pool).calling
        out.put((slot, now, time.monotonic()))
        time.sleep(hold)


def test_the_cap_holds_across_processes_and_every_call_gets_through() -> None:
    state = host(12)
    out = CTX.Queue()
    procs = [CTX.Process(target=_call, args=(state, i, 3, 0.05, out)) for i in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    seen = [out.get(timeout=5) for _ in procs]
    assert len(seen) == 12 and all(p.exitcode == 0 for p in procs)
    assert max(count for _, count, _ in seen) == 3  # the cap was reached, never passed
    assert (in_flight(state).calling, in_flight(state).priority_waiting) == (0, 0)


def test_the_priority_pool_is_let_through_first() -> None:
    state = host(6)
    for i in range(5):
        state.slots[i].pool = 0  # llm-chat
    state.slots[5].pool = 1  # llm-priority
    out = CTX.Queue()
    holder = CTX.Process(target=_call, args=(state, 0, 1, 0.5, out))
    holder.start()
    out.get(timeout=10)  # holds the one place
    waiters = [CTX.Process(target=_call, args=(state, i, 1, 0.01, out)) for i in range(1, 5)]
    for p in waiters:
        p.start()
    time.sleep(0.1)  # the ordinary waiters queue up first
    urgent = CTX.Process(target=_call, args=(state, 5, 1, 0.01, out))
    urgent.start()
    order = [out.get(timeout=10)[0] for _ in range(5)]
    for p in [holder, *waiters, urgent]:
        p.join(10)
    assert order[0] == 5, order


def _call_and_hang(state: SharedState, slot: int, out: Any) -> None:
    state.slots[slot].pid = os.getpid()
    with CallGate(state, slot, 1, -1).call("m", Deadline(60)):
        out.put("in")
        time.sleep(60)


def test_a_worker_sigkilled_mid_call_frees_its_place_at_once() -> None:
    state = host(4)
    out = CTX.Queue()
    victim = CTX.Process(target=_call_and_hang, args=(state, 0, out))
    victim.start()
    assert out.get(timeout=10) == "in"
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    # Nobody released slot 0 (no supervisor here): its place is free because its holder is dead.
    state.slots[1].pid = os.getpid()
    # Nothing will ever release it: getting in before the deadline means the dead holder was seen as dead.
    with CallGate(state, 1, 1, -1).call("m", Deadline(5)):
        assert in_flight(state).calling == 1


def _call_model_and_hang(state: SharedState, slot: int, model: str, out: Any) -> None:
    state.slots[slot].pid = os.getpid()
    with CallGate(state, slot, 10, -1).call(model, Deadline(60)):
        out.put("in")
        time.sleep(60)


def test_the_models_other_workers_are_calling_are_known_to_the_out_of_memory_fallback() -> None:
    state = host(4)
    out = CTX.Queue()
    busy = CTX.Process(target=_call_model_and_hang, args=(state, 0, "busy-model:latest", out))
    busy.start()
    try:
        assert out.get(timeout=10) == "in"
        state.slots[1].pid = os.getpid()
        mine = CallGate(state, 1, 10, -1)
        with mine.call("my-model", Deadline(5)):
            assert mine.models_in_use() == {"busy-model"}  # not my own call's model
    finally:
        os.kill(busy.pid, signal.SIGKILL)
        busy.join(10)


def test_waiting_past_the_deadline_is_a_timeout_that_names_the_setting() -> None:
    state = host(4)
    out = CTX.Queue()
    holder = CTX.Process(target=_call_and_hang, args=(state, 0, out))
    holder.start()
    try:
        assert out.get(timeout=10) == "in"
        state.slots[1].pid = os.getpid()
        with pytest.raises(ProviderError) as caught:
            with CallGate(state, 1, 1, -1).call("m", Deadline(0.2)):
                pass
        assert caught.value.kind is ErrorKind.TIMEOUT and "MAX_CONCURRENT_REQUESTS" in caught.value.message
        assert state.slots[1].call == 0
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)


def test_a_cap_no_smaller_than_the_workers_never_takes_the_lock() -> None:
    state = host(4)
    state.header.workers_wanted = 10
    gate = CallGate(state, 0, 10, -1)
    with state.lock.held():  # a held lock would block a gate that used it
        with gate.call("llama3.2:latest", Deadline(1)):
            assert state.slots[0].model == state.model_index("llama3.2", add=False) > 0
    assert state.header.pool_models[0] & (1 << state.model_index("llama3.2", add=False))
    assert state.slots[0].model == -1


# ---- reachability and pauses ----------------------------------------------------


class _Provider:
    def __init__(self, name: str) -> None:
        self.name = name


def test_reachability_is_shared_and_one_process_probes_at_a_time() -> None:
    state = host(2)
    a, b = Reachability(state.providers, state.lock), Reachability(state.providers, state.lock)
    assert not a.is_down("ollama")
    assert a.mark_down("ollama", "connection refused") is True
    assert a.mark_down("ollama", "connection refused") is False  # one transition, logged once
    assert b.is_down("ollama") and b.error("ollama") == "connection refused"
    assert not b.probe_due("ollama", every=0.2)  # the failed call was the last probe
    time.sleep(0.25)
    assert b.probe_due("ollama", every=0.2) and not a.probe_due("ollama", every=0.2)
    assert b.mark_up("ollama") and not a.is_down("ollama") and not a.mark_up("ollama")
    assert a.rows()[0]["outages"] == 1


def test_a_pool_pauses_only_when_every_model_it_served_is_unavailable() -> None:
    state = host(2)
    reach = Reachability(state.providers, state.lock)
    settings = load({"CIRCUIT_BREAKER_THRESHOLD": "2", "CIRCUIT_BREAKER_RESET_TIMEOUT": "60000"}).settings
    breakers = Breakers(state.breakers, state.lock, settings)
    ollama = _Provider("ollama")
    route = lambda model: [ollama]  # noqa: E731
    assert pause_reason([], [ollama], route, reach, breakers).pause == Pause.NONE  # type: ignore[list-item]
    for _ in range(2):
        breakers.record(breakers.admit("ollama", "a", 5), FAIL)
    verdict = pause_reason(["a", "b"], [ollama], route, reach, breakers)  # type: ignore[list-item]
    assert verdict.pause == Pause.NONE  # b still answers
    for _ in range(2):
        breakers.record(breakers.admit("ollama", "b:latest", 5), FAIL)
    verdict = pause_reason(["a", "b"], [ollama], route, reach, breakers)  # type: ignore[list-item]
    assert verdict.pause == Pause.BREAKERS_OPEN and "ollama:a" in verdict.why and "ollama:b" in verdict.why
    reach.mark_down("ollama", "connection refused")
    verdict = pause_reason([], [ollama], route, reach, breakers)  # type: ignore[list-item]
    assert verdict.pause == Pause.PROVIDER_DOWN and verdict.down == ("ollama",)
    assert "connection refused" in verdict.why


def test_provider_down_spends_no_attempt_and_is_retried_soon() -> None:
    before = time.monotonic()
    refusal = ProviderDown("ollama", "cannot reach http://x: Connection refused")
    after = time.monotonic()
    assert isinstance(refusal, JobError) and refusal.retryable and refusal.kind is ErrorKind.NETWORK
    assert before < refusal.retry_at <= after + 1.0  # soon: within a second of its making
    assert "unreachable" in refusal.message


# ---- the service ---------------------------------------------------------------------


def _status(svc: Any) -> dict[str, Any]:
    return svc.get("/status")[1]


def _ready(svc: Any) -> tuple[int, dict[str, Any]]:
    return svc.get("/health/ready")


def test_with_the_provider_stopped_workers_pause_jobs_wait_and_all_complete_after(service, sim: Simulator, r) -> None:
    svc = service(WORKER_POOLS="llm-chat=3", MAX_RETRIES="1")
    client = client_for(svc.env["REDIS_URL"])
    warm = [client.submit("chat", {"messages": [{"role": "user", "content": "hi"}]}, model="llama3.2")]
    wait_all(client, warm)
    # events are recorded (the sink publishes them soon after): their absence below counts
    eventually(lambda: [e["jobId"] for e in events(r, COMPLETED)] == warm, what="the warm job's event")
    port = sim.port
    sim.stop()  # Ollama goes away
    ids = [
        client.submit("chat", {"messages": [{"role": "user", "content": f"q{i}"}]}, model="llama3.2") for i in range(20)
    ]

    def paused() -> dict[str, Any] | None:
        pool = _status(svc)["pools"]["llm-chat"]
        return pool if pool["paused"] else None

    pool = eventually(paused, timeout=15, what="the chat pool to pause")
    assert "unreachable" in pool["pausedBecause"]  # type: ignore[index]
    code, body = _ready(svc)
    assert code == 503 and "llm-chat" in body["reason"] and "unreachable" in body["reason"]
    metrics = urllib3.request("GET", svc.url + "/metrics").data.decode()
    assert 'llm_worker_pool_paused{pool="llm-chat",reason="provider_down"} 1.0' in metrics
    assert 'llm_worker_provider_reachable{provider="ollama"} 0.0' in metrics
    assert 'llm_worker_provider_outages_total{provider="ollama"} 1.0' in metrics
    time.sleep(3)  # longer than every retry backoff: nothing may fail meanwhile
    assert r.llen("llm-chat") + r.zcard("llm:delayed") == 20  # the jobs wait for a host that can serve them
    assert not events(r, FAILED) and not events(r, DEAD_LETTERED) and r.llen("llm-dead-letter") == 0
    with Simulator(SimulatorConfig(port=port)):  # Ollama comes back on its old address
        results = wait_all(client, ids, timeout=30)
        assert all(res["success"] for res in results.values())
        assert eventually(lambda: _ready(svc)[0] == 200, what="ready again")
        metrics = urllib3.request("GET", svc.url + "/metrics").data.decode()
        assert 'llm_worker_pool_paused{pool="llm-chat",reason="provider_down"} 0.0' in metrics
        assert 'llm_worker_provider_reachable{provider="ollama"} 1.0' in metrics
    assert not events(r, FAILED) and not events(r, DEAD_LETTERED) and r.llen("llm-dead-letter") == 0


def test_every_breaker_of_a_pool_open_pauses_it_until_one_closes(service, r) -> None:
    svc = service(WORKER_POOLS="llm-chat=2", ADMIN_TOKEN="t0ken")
    client = client_for(svc.env["REDIS_URL"])
    wait_all(client, [client.submit("chat", {"messages": [{"role": "user", "content": "hi"}]}, model="llama3.2")])
    http = urllib3.PoolManager()
    admin = {"Authorization": "Bearer t0ken"}
    resp = http.request("POST", svc.url + "/admin/breakers/force-open?key=ollama:llama3.2", headers=admin)
    assert resp.status == 200, resp.data
    eventually(lambda: _status(svc)["pools"]["llm-chat"]["paused"], what="the chat pool to pause")
    assert "circuit breakers open for ollama:llama3.2" in _status(svc)["pools"]["llm-chat"]["pausedBecause"]
    job = client.submit("chat", {"messages": [{"role": "user", "content": "later"}]}, model="llama3.2")
    time.sleep(1)
    assert r.llen("llm-chat") == 1  # not taken, so not refused and parked either
    http.request("POST", svc.url + "/admin/breakers/reset?key=ollama:llama3.2", headers=admin)
    assert wait_all(client, [job])[job]["success"]
    assert not _status(svc)["pools"]["llm-chat"]["paused"]


# ---- per-model slots and per-provider caps ---------------------------------------------


def _call_capped(
    state: SharedState, slot: int, model: str, out: Any, model_slots: int = 0, provider: int = -1, provider_cap: int = 0
) -> None:
    state.slots[slot].pid = os.getpid()
    gate = CallGate(state, slot, 100, -1)
    with gate.call(model, Deadline(30), model_slots=model_slots, provider=provider, provider_cap=provider_cap):
        with state.lock.held():
            load = in_flight(state, -1, state.slots[slot].model, provider)
        out.put((model, load.model, load.provider))
        time.sleep(0.05)


def test_each_model_gets_no_more_calls_than_its_slots_and_another_model_goes_ahead() -> None:
    # Ollama serves OLLAMA_NUM_PARALLEL requests per loaded model and queues the rest inside itself.
    state = host(8)
    out = CTX.Queue()
    procs = [CTX.Process(target=_call_capped, args=(state, i, "a" if i < 6 else "b", out, 2)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    seen = [out.get(timeout=5) for _ in procs]
    assert all(p.exitcode == 0 for p in procs)
    assert max(n for model, n, _ in seen if model == "a") == 2  # reached, never passed
    assert max(n for model, n, _ in seen if model == "b") <= 2


def test_a_provider_with_one_place_gets_one_call_at_a_time() -> None:
    # llama-cpp-python's server interrupts a running generation for a new request: one call at a time.
    state = host(6)
    out = CTX.Queue()
    procs = [CTX.Process(target=_call_capped, args=(state, i, f"m{i}", out, 0, 1, 1)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    seen = [out.get(timeout=5) for _ in procs]
    assert all(p.exitcode == 0 for p in procs) and max(n for _, _, n in seen) == 1


def test_a_wait_for_a_models_slot_says_which_cap_was_full_and_is_not_a_breaker_failure() -> None:
    state = host(2)
    out = CTX.Queue()
    holder = CTX.Process(target=_call_model_and_hang, args=(state, 0, "a", out))
    holder.start()
    assert out.get(timeout=10) == "in"
    try:
        state.slots[1].pid = os.getpid()
        with pytest.raises(ProviderError) as caught:
            with CallGate(state, 1, 10, -1).call("a", Deadline(0.2), model_slots=1):
                pass
        assert "one of the model's 1 slots (OLLAMA_NUM_PARALLEL" in caught.value.message
        assert caught.value.counted is False
    finally:
        holder.kill()
        holder.join(10)
