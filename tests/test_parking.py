"""Model affinity's Lua scripts against a real Redis: park, pick, claim, unpark; a job is always in one list."""

from __future__ import annotations

import multiprocessing
import time

import msgspec
import pytest
import redis
from conftest import settings_for

from llm_worker.queue.admin import QueueAdmin
from llm_worker.queue.keys import Keys
from llm_worker.queue.parking import Parking, parked_counts, parked_models, unpark_all

Q = "llm-chat"
KEYS = Keys("llm:", "llm-dead-letter")
W1, W2 = "host-a:1", "host-b:2"
HOUR = 3_600_000


def job(job_id: str, model: str) -> bytes:
    return msgspec.json.encode({"id": job_id, "type": "chat", "model": model, "request": {"messages": []}})


def taken(r: redis.Redis, worker: str, raw: bytes) -> None:
    """As a worker's BLMOVE leaves a job: in its processing list."""
    r.lpush(KEYS.processing(worker), raw)


@pytest.fixture
def parking(r: redis.Redis) -> Parking:
    return Parking(r, KEYS, "host-a")


def park(r: redis.Redis, parking: Parking, raw: bytes, model: str, worker: str = W1) -> None:
    taken(r, worker, raw)
    assert parking.park(worker, raw, Q, model)


def every_list(r: redis.Redis) -> list[bytes]:
    """Every payload in the queue, the processing lists and the parked lists (parked ones without their time)."""
    out = r.lrange(Q, 0, -1) + r.lrange(KEYS.processing(W1), 0, -1) + r.lrange(KEYS.processing(W2), 0, -1)
    for key in r.scan_iter(match=KEYS.parked(Q, "*")):
        out += [entry.split(b"|", 1)[1] for entry in r.lrange(key, 0, -1)]
    return out


def test_park_is_fenced_and_moves_the_job_out_of_the_processing_list(r: redis.Redis, parking: Parking) -> None:
    raw = job("1", "m1")
    assert not parking.park(W1, raw, Q, "m1")  # not ours (recovered meanwhile): nothing parked
    assert r.zcard(KEYS.parked_index(Q)) == 0 and not r.exists(KEYS.parked(Q, "m1"))
    park(r, parking, raw, "m1")
    assert r.llen(KEYS.processing(W1)) == 0
    assert every_list(r) == [raw]
    assert parked_counts(r, KEYS, [Q, "llm-other"]) == {Q: {"m1": 1}}


def test_a_hot_pick_takes_the_oldest_job_of_that_model_into_the_processing_list(
    r: redis.Redis, parking: Parking
) -> None:
    first, second, other = job("1", "m1"), job("2", "m1"), job("3", "m2")
    for raw, model in ((first, "m1"), (other, "m2"), (second, "m1")):
        park(r, parking, raw, model)
    picked, _ = parking.pick(W2, Q, ["m1"], False, set(), HOUR)
    assert picked is not None and (picked.raw, picked.model, picked.why) == (first, "m1", "hot")
    assert r.lrange(KEYS.processing(W2), 0, -1) == [first]
    picked, _ = parking.pick(W2, Q, ["m1"], False, set(), HOUR)
    assert picked is not None and picked.raw == second
    # m1 has nothing left: its index entry is gone; m2 is not hot and there is no room: nothing taken.
    picked, models = parking.pick(W2, Q, ["m1"], False, set(), HOUR)
    assert picked is None and models == 1
    assert [m.decode() for m in r.zrange(KEYS.parked_index(Q), 0, -1)] == ["m2"]
    assert sorted(every_list(r)) == sorted([first, second, other])


def test_cold_picks_skip_models_other_hosts_hold_and_claim_the_model_for_this_host(
    r: redis.Redis, parking: Parking
) -> None:
    held_elsewhere, nobodys = job("1", "m1"), job("2", "m2")
    park(r, parking, held_elsewhere, "m1")
    park(r, parking, nobodys, "m2")
    picked, _ = parking.pick(W1, Q, [], True, {"m1"}, HOUR)
    assert picked is not None and (picked.raw, picked.why) == (nobodys, "cold")
    assert r.get(KEYS.claim("m2")) == b"host-a"
    # Another host's claim keeps this host off that model's jobs while it lasts.
    r.set(KEYS.claim("m1"), "host-b", px=HOUR)
    picked, models = parking.pick(W1, Q, [], True, set(), HOUR)
    assert picked is None and models == 1
    other = Parking(r, KEYS, "host-b")
    picked, _ = other.pick(W2, Q, [], True, set(), HOUR)
    assert picked is not None and picked.raw == held_elsewhere


def test_a_job_parked_past_the_bound_is_taken_by_any_host_first(r: redis.Redis, parking: Parking) -> None:
    old, hot = job("1", "m1"), job("2", "m2")
    park(r, parking, old, "m1")
    time.sleep(0.05)
    park(r, parking, hot, "m2")
    # No room, m1 held elsewhere: only the bound can hand m1's job to this host; it comes before the hot one.
    picked, _ = parking.pick(W1, Q, ["m2"], False, {"m1"}, 20)
    assert picked is not None and (picked.raw, picked.why) == (old, "overdue") and picked.waited_ms >= 20


def test_claims_are_exclusive_until_they_expire(r: redis.Redis) -> None:
    a, b = Parking(r, KEYS, "host-a"), Parking(r, KEYS, "host-b")
    assert a.claim("m1") and a.claim("m1")  # its own claim, renewed
    assert not b.claim("m1")
    assert a.claims(["m1", "m2"]) == {"m1": "host-a"}
    r.pexpire(KEYS.claim("m1"), 1)
    time.sleep(0.01)
    assert b.claim("m1")


def test_unpark_moves_every_job_back_oldest_served_first(r: redis.Redis, parking: Parking) -> None:
    jobs = [job(str(i), f"m{i % 2}") for i in range(7)]
    for i, raw in enumerate(jobs):
        park(r, parking, raw, f"m{i % 2}")
    assert parked_models(r, KEYS, [Q]) == ["m0", "m1"]
    assert unpark_all(r, KEYS, Q, most=3) == 7
    assert r.zcard(KEYS.parked_index(Q)) == 0 and not list(r.scan_iter(match=KEYS.parked(Q, "*")))
    served = [r.rpop(Q) for _ in range(7)]
    # Within each model, parked order is served order.
    for model in ("m0", "m1"):
        mine = [raw for raw in jobs if msgspec.json.decode(raw)["model"] == model]
        assert [raw for raw in served if raw in mine] == mine


def _picker(redis_url: str, worker: str, host: str, out: multiprocessing.Queue) -> None:
    client = redis.Redis.from_url(redis_url)
    parking = Parking(client, KEYS, host)
    got = []
    while True:
        picked, models = parking.pick(worker, Q, ["m0", "m1", "m2"], True, set(), 0)
        if picked is None:
            if models == 0:
                break
            continue
        got.append(picked.raw)
    out.put(got)


def test_concurrent_pickers_take_each_parked_job_exactly_once(r: redis.Redis, redis_url: str, parking: Parking) -> None:
    jobs = [job(str(i), f"m{i % 3}") for i in range(300)]
    for i, raw in enumerate(jobs):
        park(r, parking, raw, f"m{i % 3}")
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_picker, args=(redis_url, w, w.split(":")[0], out)) for w in (W1, W2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    taken_all = got[0] + got[1]
    assert sorted(taken_all) == sorted(jobs)  # none lost, none twice
    assert sorted(r.lrange(KEYS.processing(W1), 0, -1) + r.lrange(KEYS.processing(W2), 0, -1)) == sorted(jobs)
    assert r.zcard(KEYS.parked_index(Q)) == 0


def test_admin_counts_parked_jobs_as_waiting_and_purges_them_with_their_queue(
    r: redis.Redis, redis_url: str, parking: Parking
) -> None:
    admin = QueueAdmin(r, settings_for({"REDIS_URL": redis_url}))
    park(r, parking, job("1", "m1"), "m1")
    park(r, parking, job("2", "m2"), "m2")
    r.lpush(Q, job("3", "m1"))
    assert admin.depths().parked == {Q: {"m1": 1, "m2": 1}}
    assert admin.stats()[Q] == {"waiting": 3, "parked": 2, "active": 0, "completed": 0, "failed": 0}
    assert admin.purge(Q) == 3
    assert not r.exists(Q) and not list(r.scan_iter(match="llm:parked:*"))


def test_a_host_whose_workers_all_pause_or_that_drains_withdraws_what_it_holds(r: redis.Redis) -> None:
    # Other hosts would park jobs for it until MODEL_AFFINITY_MAX_WAIT: it takes none.
    from llm_worker.host.layout import Phase, SlotState
    from llm_worker.host.shm import SharedState
    from llm_worker.models.fleet import Fleet, FleetDuty

    state = SharedState(4)
    for slot in state.slots[:2]:
        slot.pid, slot.state = 4242, SlotState.IDLE
    fleet = Fleet(r, KEYS, "host-a")
    duty = FleetDuty(settings_for({"MODEL_AFFINITY": "false"}), state, fleet, [])
    duty.share()
    assert "host-a" in fleet.read()
    for slot in state.slots[:2]:
        slot.paused = 1  # Pause.PROVIDER: its provider down
    duty.share()
    assert "host-a" not in fleet.read()
    for slot in state.slots[:2]:
        slot.paused = 0
    duty.share()
    assert "host-a" in fleet.read()
    state.header.phase = Phase.DRAINING
    duty.share()
    assert "host-a" not in fleet.read() and not r.exists(KEYS.holdings("host-a"))
