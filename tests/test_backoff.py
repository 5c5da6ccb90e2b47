"""The one backoff: its numbers, its cap and its jitter, and the waits of the callers that use it."""

from __future__ import annotations

import random
import time

import pytest

from llm_worker.host.backoff import compute_backoff
from llm_worker.supervisor.children import RESPAWN_CAP, Child, Exit
from llm_worker.supervisor.services import FIRST_BACKOFF, LIVED_LONG, Services


def test_doubles_from_base_after_the_first_failure_up_to_the_cap() -> None:
    waits = [compute_backoff(n, 0.5, cap=5.0) for n in range(1, 7)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_another_factor() -> None:
    assert [compute_backoff(n, 1.0, cap=100.0, factor=3.0) for n in range(1, 5)] == [1.0, 3.0, 9.0, 27.0]


def test_no_failure_yet_waits_the_base() -> None:
    assert compute_backoff(0, 0.25, cap=30.0) == compute_backoff(-3, 0.25, cap=30.0) == 0.25


def test_a_huge_count_of_attempts_is_the_cap_not_an_overflow() -> None:
    assert compute_backoff(10**9, 0.1, cap=30.0) == 30.0
    assert compute_backoff(10**9, 0.1, cap=float("inf")) == 0.1 * 2.0**30


def test_equal_jitter_waits_between_half_and_the_whole() -> None:
    rand = random.Random(7)
    waits = [compute_backoff(3, 1.0, cap=30.0, jitter="equal", rand=rand) for _ in range(500)]
    assert all(2.0 <= w <= 4.0 for w in waits)
    assert max(waits) - min(waits) > 1.5  # spread, so that what failed together does not retry together


def test_up_jitter_never_waits_less_and_at_most_a_fifth_more() -> None:
    rand = random.Random(7)
    waits = [compute_backoff(9, 1.0, cap=30.0, jitter="up", rand=rand) for _ in range(500)]
    assert all(30.0 <= w <= 36.0 for w in waits)  # jitter comes after the cap
    assert max(waits) - min(waits) > 4.0


def test_unknown_jitter_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown jitter"):
        compute_backoff(1, 1.0, cap=1.0, jitter="full")


def test_a_service_child_dying_young_waits_longer_each_time_up_to_the_respawn_cap() -> None:
    services = Services({"http": lambda launch: None})
    service = next(iter(services))
    delays = []
    for pid in range(100, 112):
        child = Child(pid=pid, kind="http")
        services.spawned(service, child)
        delays.append(services.exited(Exit(child, 1, None))[1])
    assert delays[:4] == [FIRST_BACKOFF, 2 * FIRST_BACKOFF, 4 * FIRST_BACKOFF, 8 * FIRST_BACKOFF]
    assert delays[-1] == RESPAWN_CAP

    # After a long life it starts again from the first wait.
    child = Child(pid=200, kind="http", spawned=time.monotonic() - LIVED_LONG - 1)
    services.spawned(service, child)
    assert services.exited(Exit(child, 1, None))[1] == FIRST_BACKOFF
