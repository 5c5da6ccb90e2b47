"""conf/llm-worker.service: systemd accepts it, its hardening score holds, and it keeps what llm-worker needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm_worker import exitcodes
from llm_worker.settings import config

UNIT = Path(__file__).resolve().parents[1] / "conf" / "llm-worker.service"
# `systemd-analyze security --offline=true` gives 1.6 with systemd 252; the
# unit's comments say what is left and why (network, NVIDIA devices, /proc, ...).
MAX_EXPOSURE = 1.6
# What the supervisor needs after the graceful timeout: kill the stragglers,
# hand their jobs back, stop the HTTP process.
STOP_MARGIN_S = 10


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> its values in order (a key may repeat), comments left out."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def seconds(timespan: str) -> float:
    """A systemd time span of the forms this unit uses: ``45``, ``45s``, ``2min``, ``1min 30s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan)
    assert parts and "".join(n + u for n, u in parts) == timespan.replace(" ", ""), timespan
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


# ---- systemd's own checks -------------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is not on PATH; CI must install systemd to check the unit")
        pytest.skip("systemd-analyze is not on PATH (install systemd to check conf/llm-worker.service)")
    return path


def llm_worker_executable() -> str:
    found = shutil.which("llm-worker") or shutil.which("llm-worker", path=str(Path(sys.executable).parent))
    return found or sys.executable


@pytest.fixture
def checkable_copy(tmp_path: Path) -> Path:
    """The unit, with commands that exist on this machine: verify refuses a missing ExecStart binary.

    User= and Group= stay: systemd-analyze verify does not look the user up (that
    happens when the service starts), so a machine without an llm-worker user,
    like this one, checks the unit as shipped.
    """
    text = UNIT.read_text().replace("/usr/local/bin/llm-worker", llm_worker_executable())
    kill = "/bin/kill" if os.access("/bin/kill", os.X_OK) else shutil.which("kill")
    assert kill, "no kill executable for ExecReload"
    text = text.replace("/bin/kill ", kill + " ")
    copy = tmp_path / UNIT.name  # the same name: both tools report by unit name
    copy.write_text(text)
    return copy


def warnings_about(copy: Path, output: str) -> list[str]:
    # Only lines about this unit: a host's other units may draw warnings of their own.
    return [line for line in output.splitlines() if str(copy) in line or line.startswith(copy.name + ":")]


def verify(systemd_analyze: str, copy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )


def test_systemd_accepts_the_unit(systemd_analyze: str, checkable_copy: Path) -> None:
    result = verify(systemd_analyze, checkable_copy)
    assert result.returncode == 0, result.stderr
    assert warnings_about(checkable_copy, result.stdout + result.stderr) == []


def test_verify_would_catch_a_mistake(systemd_analyze: str, checkable_copy: Path) -> None:
    # The check above is only worth something if a bad line shows up in it.
    checkable_copy.write_text(checkable_copy.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    result = verify(systemd_analyze, checkable_copy)
    assert any("kill mode" in line.lower() for line in warnings_about(checkable_copy, result.stdout + result.stderr))


def test_hardening_exposure_stays_low(systemd_analyze: str, checkable_copy: Path) -> None:
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(checkable_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(rf"Overall exposure level for {re.escape(checkable_copy.name)}: (\d+(?:\.\d+)?)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


# ---- what llm-worker relies on ------------------------------------------------------


def test_systemd_is_told_about_readiness_and_liveness(unit: dict[str, list[str]]) -> None:
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"  # the supervisor notifies, its workers never
    assert 0 < seconds(one(unit, "Service.WatchdogSec"))
    assert "AF_UNIX" in one(unit, "Service.RestrictAddressFamilies").split()  # NOTIFY_SOCKET is one


def test_stop_drains_before_anything_is_killed(unit: dict[str, list[str]]) -> None:
    graceful_ms = next(d.default for d in config.declarations() if d.env == "WORKER_GRACEFUL_TIMEOUT")
    assert one(unit, "Service.KillMode") == "mixed"  # TERM to the supervisor only; it drains its workers
    assert one(unit, "Service.KillSignal") == "SIGTERM"
    assert seconds(one(unit, "Service.TimeoutStopSec")) >= graceful_ms / 1000 + STOP_MARGIN_S


def test_reload_sends_hup_to_the_supervisor(unit: dict[str, list[str]]) -> None:
    assert re.fullmatch(r"\S*kill -(HUP|SIGHUP|s HUP) \$MAINPID", one(unit, "Service.ExecReload"))


def test_it_starts_without_a_toml_file(unit: dict[str, list[str]]) -> None:
    # `--config` naming a missing file stops start-up; the environment file is optional ("-").
    command = one(unit, "Service.ExecStart").split()
    assert command[1:] == ["run"]
    assert one(unit, "Service.EnvironmentFile").startswith("-")


def test_configuration_errors_are_not_restarted(unit: dict[str, list[str]]) -> None:
    assert one(unit, "Service.Restart") == "on-failure"
    prevented = {int(code) for code in one(unit, "Service.RestartPreventExitStatus").split()}
    assert {exitcodes.USAGE, exitcodes.WORKER_BOOT_ERROR} <= prevented
    assert int(one(unit, "Unit.StartLimitBurst")) > 0


def test_the_gpus_stay_reachable(unit: dict[str, list[str]]) -> None:
    assert unit.get("Service.PrivateDevices", ["no"]) == ["no"]  # it would hide /dev/nvidia*
    assert one(unit, "Service.DevicePolicy") == "closed"
    allowed = dict(entry.split() for entry in unit["Service.DeviceAllow"])
    # /dev/nvidiactl and /dev/nvidia0..N under the driver's old and new names, and CUDA's UVM.
    for group in ("char-nvidia-frontend", "char-nvidia", "char-nvidiactl", "char-nvidia-uvm"):
        assert set(allowed.get(group, "")) >= {"r", "w"}, group


def test_ollama_stays_visible(unit: dict[str, list[str]]) -> None:
    # Ollama runs as another user: the sampler finds its pids in /proc, and NVML names them from /proc.
    assert unit.get("Service.ProtectProc", ["default"]) == ["default"]
    assert unit.get("Service.ProcSubset", ["all"]) == ["all"]  # /proc/meminfo, /proc/driver/nvidia
