"""The chaos drill, 90 seconds of it: two hosts, every disruption, and not one job lost or answered twice.

This runs ``scripts/chaos.py`` as a user runs ``scripts/chaos``: its own Redis
(AOF), its own simulator, two real supervisors. The drill checks conservation
itself and exits 1 when it breaks; this test also reads its figures, so that a
drill that quietly skipped its disruptions, or whose hosts did not share the
work, fails too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[1]
DURATION = 90


def drill(tmp_path: Path, duration: int, *options: str) -> tuple[dict[str, Any], str]:
    """Run the drill as ``scripts/chaos`` does; its figures, and the end of its report for failure messages."""
    figures_path = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "chaos.py"),
            "--duration",
            str(duration),
            "--json",
            str(figures_path),
            "--workdir",
            str(tmp_path / "drill"),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 420,
        cwd=ROOT,
    )
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert "CONSERVATION HOLDS" in done.stdout, report
    return msgspec.json.decode(figures_path.read_bytes()), report


@pytest.mark.slow
def test_ninety_seconds_of_chaos_lose_nothing_and_answer_nothing_twice(tmp_path: Path) -> None:
    figures, report = drill(tmp_path, DURATION)
    c = figures["conservation"]

    # Conservation: every job pushed has one terminal outcome, none two, nothing left anywhere.
    assert c["holds"] and c["lost"] == 0 and c["answeredTwice"] == 0, report
    assert c["leftovers"] == {"queued": 0, "processing": 0, "parked": 0, "delayed": 0}, report
    assert c["outcomesCounted"] == c["jobsAnswered"] > 100, report

    # Every disruption ran, and the ones that hold jobs really caught jobs in hand.
    names = {d["name"] for d in figures["disruptions"]}
    assert len(names) == 11, names
    kills = figures["kills"]
    assert kills["workersSigkilled"] >= 2 and kills["hostsKilled"] >= 1 and kills["redisKilled"] >= 1, kills
    assert any(
        r["what"] == "worker stopped past its job's timeout" and r["seconds"] is not None for r in figures["reclaims"]
    ), figures["reclaims"]
    assert figures["serviceLogs"]["recoveries"] >= 1, figures["serviceLogs"]

    # Two hosts shared the work, and a dead host's jobs were taken up by the other.
    per_host = c["answeredPerHost"]
    assert set(per_host) == {"host-a", "host-b"} and min(per_host.values()) > 0.2 * sum(per_host.values()), per_host
    recoveries = figures["hostRecoveries"]
    assert recoveries and all(r["seconds"] is not None for r in recoveries), recoveries
    assert all(r["recoveredBy"] != r["host"] for r in recoveries), recoveries

    # Each host freeze or kill counted the jobs it caught in hand, and at least one caught some.
    held = [
        d
        for d in figures["disruptions"]
        if d["name"] in ("kill a host and restart it", "freeze a host past its heartbeat expiry")
    ]
    assert held and all(isinstance(d.get("jobsHeld"), int) for d in held), held
    assert any(d["jobsHeld"] >= 1 for d in held), held

    # A frozen host held jobs, and when it woke the fence dropped its late outcomes for them. The drill
    # freezes a host just after one of its workers took a job, so every freeze holds one and drops one.
    frozen = [d for d in held if d["name"] == "freeze a host past its heartbeat expiry"]
    assert frozen and all(d["jobsHeld"] >= 1 and d["lateOutcomesDropped"] >= 1 for d in frozen), frozen
    assert figures["serviceLogs"]["duplicatesSuppressed"] >= 1, figures["serviceLogs"]
    assert "duplicates suppressed (outcomes dropped by the fence): " in report, report

    # Malformed payloads: each dead-lettered once, answered when it named an id.
    assert figures["pushed"]["malformed"] >= 8 and c["unknownDeadLetters"] == 0, report


@pytest.mark.slow
def test_chaos_under_sentinel_failovers_loses_nothing(tmp_path: Path) -> None:
    """One cycle of every disruption with Redis as a master, a replica and three sentinels.

    'Kill and restart Redis' kills the master, and a planned SENTINEL FAILOVER
    joins in: two failovers, each of which must promote the replica, under the
    same conservation check.
    """
    figures, report = drill(tmp_path, 30, "--sentinel", "--seed", "3")
    c = figures["conservation"]
    assert figures["config"]["redis"] == "sentinel", figures["config"]
    assert c["holds"] and c["lost"] == 0 and c["answeredTwice"] == 0, report
    assert c["leftovers"] == {"queued": 0, "processing": 0, "parked": 0, "delayed": 0}, report
    assert c["outcomesCounted"] == c["jobsAnswered"] > 50, report
    failovers = [
        d for d in figures["disruptions"] if d["name"] in ("kill and restart Redis", "planned Sentinel failover")
    ]
    assert {d["name"] for d in failovers} == {"kill and restart Redis", "planned Sentinel failover"}, failovers
    # How soon the old master rejoins as a replica is Redis's pace (the sentinels' 10-s look at roles, the
    # master's diskless-sync delay), so it is reported, not asserted.
    for d in failovers:
        assert d["newMaster"] != d["oldMaster"] and d["failoverSeconds"] is not None, d
