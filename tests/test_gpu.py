"""GPU readings through NVML, against the fake binding in fake_pynvml.py (no GPU here)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import fake_pynvml
import msgspec
import pytest
from fake_pynvml import GiB, gpu

from llm_worker.http.gpu import GpuReading, GpuSampler, ollama_memory

FAKE = "fake_pynvml"
TESTS = Path(__file__).parent


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[ModuleType]:
    fake_pynvml.configure()
    yield fake_pynvml
    fake_pynvml.configure()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def two_gpus() -> list[dict[str, Any]]:
    return [
        gpu(
            0,
            utilization=37,
            memory_used=12 * GiB,
            memory_total=24 * GiB,
            temperature=71,
            power_mw=215_500,
            energy_mj=3_600_000_000,
            name="NVIDIA GeForce RTX 4090",
            processes=[
                {"pid": 4242, "name": "/usr/local/bin/ollama", "used": 9 * GiB},
                {"pid": 777, "name": "python3", "used": 2 * GiB},
            ],
        ),
        gpu(
            1,
            utilization=100,
            memory_used=30 * GiB,
            memory_total=80 * GiB,
            temperature=55,
            power_mw=400_000,
            energy_mj=1_500,
            name="NVIDIA H100 80GB HBM3",
            processes=[{"pid": 4243, "name": "/usr/local/bin/ollama", "used": 28 * GiB}],
        ),
    ]


def nvml_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llm_worker.http.gpu"]


def test_two_gpus_every_field_in_si_units(fake: ModuleType) -> None:
    fake.configure(gpus=two_gpus(), driver_version="550.54.15")

    reading = GpuSampler(FAKE).sample()

    assert reading.collector_up and reading.error is None
    assert reading.driver_version == "550.54.15"
    first, second = reading.gpus
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA GeForce RTX 4090", two_gpus()[0]["uuid"])
    assert first.utilization_ratio == pytest.approx(0.37)
    assert (first.memory_used_bytes, first.memory_total_bytes) == (12 * GiB, 24 * GiB)
    assert first.temperature_celsius == 71
    assert first.power_watts == pytest.approx(215.5)
    assert first.energy_joules == pytest.approx(3_600_000.0)
    assert [(p.pid, p.name, p.used_bytes) for p in first.processes or []] == [
        (4242, "/usr/local/bin/ollama", 9 * GiB),
        (777, "python3", 2 * GiB),
    ]
    assert second.index == 1 and second.utilization_ratio == 1.0 and second.energy_joules == pytest.approx(1.5)
    assert ollama_memory(reading, pids=[4242, 4243]) == {0: 9 * GiB, 1: 28 * GiB}
    assert ollama_memory(reading, pids=[4243]) == {1: 28 * GiB}
    assert ollama_memory(reading, names=["ollama"]) == {0: 9 * GiB, 1: 28 * GiB}
    assert ollama_memory(reading) == {}


def test_reading_is_a_plain_value_that_encodes(fake: ModuleType) -> None:
    fake.configure(gpus=two_gpus())
    reading = GpuSampler(FAKE).sample()

    assert msgspec.json.decode(msgspec.json.encode(reading), type=GpuReading) == reading


@pytest.mark.parametrize(
    ("module", "fail_init", "reason"),
    [
        ("llm_worker_no_such_nvml_binding", None, "cannot import llm_worker_no_such_nvml_binding"),
        (FAKE, "driver_not_loaded", "DriverNotLoaded"),
        (FAKE, "library_not_found", "LibraryNotFound"),
        (FAKE, "unknown", "nvmlInit failed"),
    ],
)
def test_no_driver_is_a_state_told_once(
    fake: ModuleType,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    module: str,
    fail_init: str | None,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="llm_worker.http.gpu")
    fake.configure(fail_init=fail_init)
    sampler = GpuSampler(module, clock=clock)

    readings = []
    for _ in range(5):  # across retries too: each fails the same way, and says nothing more
        readings.append(sampler.sample())
        clock.now += 61

    assert all(not r.collector_up and r.gpus == [] and reason in (r.error or "") for r in readings)
    assert len(nvml_log(caplog)) == 1 and reason in nvml_log(caplog)[0].getMessage()
    if module == FAKE:
        assert fake.calls.count("nvmlInit") == 5


def test_partly_unsupported_reads_the_rest(fake: ModuleType) -> None:
    fake.configure(
        gpus=[
            gpu(
                0,
                errors={"temperature": "unknown"},
                processes=[
                    {"pid": 10, "name": "ollama", "used": None},
                    {"pid": 11, "name": "ollama", "used": fake.NVML_VALUE_NOT_AVAILABLE},  # older bindings' raw -1
                    {"pid": 12, "name": "ollama", "used": 3 * GiB},
                ],
            ),
            gpu(1, unsupported=["utilization", "memory", "processes", "uuid"]),
        ],
        unsupported={"power", "energy"},
    )

    reading = GpuSampler(FAKE).sample()

    assert reading.collector_up
    first, second = reading.gpus
    assert (first.power_watts, first.energy_joules, first.temperature_celsius) == (None, None, None)
    assert first.utilization_ratio == 0.5 and first.memory_total_bytes == 80 * GiB and first.uuid
    assert [(p.pid, p.used_bytes) for p in first.processes or []] == [(10, None), (11, None), (12, 3 * GiB)]
    assert ollama_memory(reading, pids=[10, 11, 12]) == {0: 3 * GiB}
    assert (second.utilization_ratio, second.memory_used_bytes, second.memory_total_bytes) == (None, None, None)
    assert (second.processes, second.uuid) == (None, None)
    assert second.temperature_celsius == 60 and second.name == "NVIDIA Fake A100 80GB"


def test_zero_gpus_is_down_with_a_reason(fake: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llm_worker.http.gpu")
    fake.configure(gpus=[])
    sampler = GpuSampler(FAKE)

    readings = [sampler.sample() for _ in range(3)]

    assert all(not r.collector_up and "no GPU" in (r.error or "") for r in readings)
    assert len(nvml_log(caplog)) == 1
    assert fake.calls.count("nvmlInit") == 1 and fake.calls.count("nvmlShutdown") == 1


def test_init_is_retried_at_most_once_a_minute(
    fake: ModuleType, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_worker.http.gpu")
    fake.configure(fail_init="driver_not_loaded")
    sampler = GpuSampler(FAKE, clock=clock)

    # Given a failed initialisation, samples within the minute do not try again.
    sampler.sample()
    for _ in range(59):
        clock.now += 1
        assert not sampler.sample().collector_up
    assert fake.calls.count("nvmlInit") == 1

    # When the minute has passed and the driver is back, the next sample initialises.
    fake.configure(gpus=two_gpus())
    clock.now += 1.5
    reading = sampler.sample()

    # Then readings flow again, and the recovery is said once.
    assert reading.collector_up and len(reading.gpus) == 2
    assert fake.calls.count("nvmlInit") == 1
    sampler.sample()
    assert fake.calls.count("nvmlInit") == 1
    assert [r.getMessage().split(":")[0] for r in nvml_log(caplog)] == [
        "GPU readings unavailable (retrying every 60s)",
        "GPU readings available",
    ]


def test_gpu_lost_after_init_is_down_then_retried(
    fake: ModuleType, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampler = GpuSampler(FAKE, clock=clock)
    assert sampler.sample().collector_up

    def lost() -> int:
        raise fake.NVMLError(fake.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(fake, "nvmlDeviceGetCount", lost)
    down = sampler.sample()
    assert not down.collector_up and "GpuIsLost" in (down.error or "")
    assert fake.calls.count("nvmlShutdown") == 1
    monkeypatch.undo()

    clock.now += 30
    assert sampler.sample() == down and fake.calls.count("nvmlInit") == 1
    clock.now += 31
    assert sampler.sample().collector_up and fake.calls.count("nvmlInit") == 2


def test_a_binding_that_raises_anything_never_raises_out(fake: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> int:
        raise RuntimeError("binding bug")

    monkeypatch.setattr(fake, "nvmlDeviceGetCount", broken)
    monkeypatch.setattr(fake, "nvmlDeviceGetName", broken)

    reading = GpuSampler(FAKE).sample()

    assert not reading.collector_up and "RuntimeError: binding bug" in (reading.error or "")


def test_older_bindings_bytes_are_decoded(fake: ModuleType) -> None:
    fake.configure(bytes_strings=True, gpus=[gpu(0, processes=[{"pid": 5, "name": "ollama", "used": 1}])])

    reading = GpuSampler(FAKE).sample()

    assert reading.driver_version == "550.54.15"
    assert reading.gpus[0].name == "NVIDIA Fake A100 80GB" and (reading.gpus[0].processes or [])[0].name == "ollama"


def test_close_shuts_nvml_down_and_sample_starts_again(fake: ModuleType) -> None:
    sampler = GpuSampler(FAKE)
    sampler.close()
    assert fake.calls == []  # nothing to shut down before a sample

    sampler.sample()
    sampler.close()
    assert fake.calls.count("nvmlShutdown") == 1
    assert sampler.sample().collector_up and fake.calls.count("nvmlInit") == 2


def test_sampler_built_before_fork_initialises_only_in_the_child(fake: ModuleType) -> None:
    # Given a sampler built in the parent, as the supervisor builds it before forking.
    sampler = GpuSampler(FAKE)
    assert fake.calls == []

    # When a forked child samples.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its reading and its call log, then leave without pytest's teardown
        try:
            reading = sampler.sample()
            os.write(write_end, json.dumps({"up": reading.collector_up, "calls": fake.calls}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)

    # Then NVML was initialised in the child, never in the parent.
    assert child["up"] and child["calls"][0] == "nvmlInit"
    assert fake.calls == []


def test_sampler_initialised_before_fork_initialises_again_in_the_child(fake: ModuleType) -> None:
    sampler = GpuSampler(FAKE)
    sampler.sample()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fake.calls.clear()
            sampler.sample()
            os.write(write_end, json.dumps(fake.calls[:1] + ["nvmlShutdown" in fake.calls]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        assert json.loads(pipe.read()) == ["nvmlInit", False]  # its own init; the parent's left alone
    os.waitpid(pid, 0)


def test_end_to_end_in_another_process_from_the_environment() -> None:
    scenario = {
        "gpus": [gpu(0, utilization=80, processes=[{"pid": 99, "name": "ollama", "used": 5 * GiB}])],
        "unsupported": ["energy"],
        "driver_version": "535.1",
    }
    env = {
        **os.environ,
        "FAKE_NVML_SCENARIO": json.dumps(scenario),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    script = (
        "import sys, msgspec; from llm_worker.http.gpu import GpuSampler; "
        "sys.stdout.buffer.write(msgspec.json.encode(GpuSampler('fake_pynvml').sample()))"
    )

    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60, check=True)

    reading = msgspec.json.decode(done.stdout, type=GpuReading)
    assert reading.collector_up and reading.driver_version == "535.1"
    assert reading.gpus[0].utilization_ratio == 0.8 and reading.gpus[0].energy_joules is None
    assert ollama_memory(reading, pids=[99]) == {0: 5 * GiB}
