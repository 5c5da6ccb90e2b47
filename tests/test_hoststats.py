"""Host and process readings through psutil, against this machine's real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from llm_worker.http.hoststats import HostReading, ProcessWatcher, find_processes, host_reading, process_reading

MB = 1_000_000
HOLDS_50MB = "import time; x = bytearray(50_000_000); print('ready', flush=True); time.sleep(30)"


@pytest.fixture
def holder() -> Iterator[subprocess.Popen[str]]:
    """A child process holding 50 MB, up and allocated when the fixture returns."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDS_50MB], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


def spin(seconds: float) -> None:
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        pass


def test_host_reading_is_plausible(tmp_path: Path) -> None:
    first = host_reading()
    spin(0.05)
    second = host_reading(str(tmp_path))

    assert second.cpu_ratio is not None and 0.0 <= second.cpu_ratio <= 1.0
    assert second.cpu_count and second.cpu_count >= 1
    assert second.load_1m is not None and second.load_1m >= 0
    total, used, available = second.memory_total_bytes, second.memory_used_bytes, second.memory_available_bytes
    assert total and used and available and total > used > 0 and total >= available > 0
    assert second.swap_total_bytes is not None and second.swap_used_bytes is not None
    assert second.disk_path == str(tmp_path) and second.disk_total_bytes and second.disk_total_bytes > 0
    assert second.disk_used_bytes is not None and 0 <= second.disk_used_bytes <= second.disk_total_bytes
    assert first.net_sent_bytes is not None and second.net_sent_bytes is not None
    assert first.net_recv_bytes is not None and second.net_recv_bytes is not None
    assert second.net_sent_bytes >= first.net_sent_bytes and second.net_recv_bytes >= first.net_recv_bytes
    assert second.boot_time and second.boot_time < time.time()
    assert msgspec.json.decode(msgspec.json.encode(second), type=HostReading) == second


def test_cpu_ratio_is_unknown_on_a_threads_first_call() -> None:
    ratios: list[float | None] = []

    def sample_twice() -> None:
        ratios.append(host_reading().cpu_ratio)
        spin(0.05)
        ratios.append(host_reading().cpu_ratio)

    thread = threading.Thread(target=sample_twice)
    thread.start()
    thread.join()

    assert ratios[0] is None and ratios[1] is not None and 0.0 <= ratios[1] <= 1.0


def test_a_missing_disk_path_leaves_only_the_disk_unknown(tmp_path: Path) -> None:
    reading = host_reading(str(tmp_path / "missing"))

    assert reading.disk_used_bytes is None and reading.disk_total_bytes is None
    assert reading.memory_total_bytes and reading.cpu_count


def test_process_reading_of_a_real_child(holder: subprocess.Popen[str]) -> None:
    watcher = ProcessWatcher()

    first = watcher.read([holder.pid])[holder.pid]
    second = watcher.read([holder.pid])[holder.pid]

    assert first.pid == holder.pid and first.rss_bytes > 50 * MB
    assert first.cpu_ratio is None and second.cpu_ratio is not None and second.cpu_ratio >= 0.0
    assert second.cpu_seconds >= first.cpu_seconds > 0
    assert first.threads >= 1 and first.open_fds is not None and first.open_fds >= 3
    one_off = process_reading(holder.pid)
    assert one_off is not None and one_off.rss_bytes > 50 * MB and one_off.cpu_ratio is None


def test_cpu_seconds_count_up_in_a_busy_process() -> None:
    watcher = ProcessWatcher()
    before = watcher.read([os.getpid()])[os.getpid()]
    spin(0.2)
    after = watcher.read([os.getpid()])[os.getpid()]

    assert after.cpu_seconds >= before.cpu_seconds + 0.15
    assert after.cpu_ratio is not None and after.cpu_ratio > 0.0


def test_a_dead_pid_gives_nothing_and_is_dropped(holder: subprocess.Popen[str]) -> None:
    watcher = ProcessWatcher()
    assert holder.pid in watcher.read([holder.pid, os.getpid()])
    assert holder.pid in watcher and len(watcher) == 2

    holder.kill()
    holder.wait()

    readings = watcher.read([holder.pid, os.getpid()])
    assert holder.pid not in readings and os.getpid() in readings
    assert holder.pid not in watcher and len(watcher) == 1
    assert process_reading(holder.pid) is None


def test_pids_not_read_for_a_while_are_forgotten(holder: subprocess.Popen[str]) -> None:
    now = [0.0]
    watcher = ProcessWatcher(forget_after_s=60, clock=lambda: now[0])
    watcher.read([holder.pid])
    now[0] = 30.0
    watcher.read([os.getpid()])
    assert holder.pid in watcher

    now[0] = 61.0
    watcher.read([os.getpid()])

    assert holder.pid not in watcher and os.getpid() in watcher


def test_nonsense_pids_never_raise() -> None:
    assert ProcessWatcher().read([-1, 0x7FFFFFFF]) == {}
    assert process_reading(-1) is None


def test_find_processes_by_name_and_argv0(tmp_path: Path) -> None:
    # Given an "ollama" (a copy of sleep), an "ollama" run through a symlink,
    # and a process whose name merely contains the word.
    sleep = shutil.which("sleep")
    assert sleep
    shutil.copy(sleep, tmp_path / "ollama")
    (tmp_path / "bin").mkdir()
    os.symlink(sleep, tmp_path / "bin" / "ollama")
    shutil.copy(sleep, tmp_path / "ollama-notreally")
    started = [
        subprocess.Popen([str(path), "30"])
        for path in (tmp_path / "ollama", tmp_path / "bin" / "ollama", tmp_path / "ollama-notreally")
    ]
    try:
        # When the host is scanned for Ollama.
        found = find_processes()

        # Then both "ollama" processes are found, and nothing else of ours.
        assert started[0].pid in found and started[1].pid in found
        assert started[2].pid not in found and os.getpid() not in found
        assert started[2].pid in find_processes(names=("ollama-notreally",))
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
