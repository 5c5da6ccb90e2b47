"""The Node client (clients/node, @llm-worker/client) against a real service: a Node process submits, streams and waits.

Real parts only: a private redis-server, ``llm-worker run`` against the Ollama
simulator, and ``node`` running the package's scripts, whose JSON lines are
asserted here. The package's dependencies are installed once with ``npm ci``
(into clients/node/node_modules, from npm's cache in ~/.npm when it has them)
and not again while the lock file is unchanged. Without node and npm the tests
skip, saying why; in CI (CI=true) they fail, since scripts/test installs them
there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
from support import assert_each_answered_once, events, eventually, held_by

from llm_worker.devtools.simulator import Simulator, SimulatorConfig
from llm_worker.devtools.simulator.config import DEFAULT_MODELS
from llm_worker.protocol.jobs import decode
from llm_worker.settings.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "node"
NODE_MAJOR = 18  # the oldest Node the package supports (package.json engines); Debian 12's nodejs
INSTALL_SECONDS = 300.0  # npm ci: seconds from the cache, a minute or two from the registry on a slow network
RUN_SECONDS = 180.0  # a Node script: its waits are generous, for a loaded 2-core machine
UNSERVED = "llm-node-unserved"  # a list that no worker serves (test/scenario.mjs's wait that times out)


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {why}", pytrace=False)
    pytest.skip(why)


def _npm_ci(npm: str) -> None:
    """``npm ci`` into clients/node/node_modules, unless it already holds this lock file's packages."""
    lock = PACKAGE / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    stamp = PACKAGE / "node_modules" / f".llm-worker-{digest}"
    if stamp.exists():
        return
    # xdist runs test processes side by side: one installs while the others wait. The lock file is
    # outside node_modules, which npm ci deletes first.
    guard = Path(tempfile.gettempdir()) / f"llm-worker-npm-{hashlib.sha256(bytes(PACKAGE)).hexdigest()[:12]}.lock"
    with open(guard, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if stamp.exists():
            return
        command = [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"]
        try:
            done = subprocess.run(command, cwd=PACKAGE, capture_output=True, text=True, timeout=INSTALL_SECONDS)
        except subprocess.TimeoutExpired:
            _unavailable(f"`npm ci` in {PACKAGE} took over {INSTALL_SECONDS:.0f}s")
        if done.returncode != 0:
            _unavailable(f"`npm ci` in {PACKAGE} failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
        stamp.touch()


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with the package's dependencies installed; skip (fail in CI) when there is none."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if path is None)
        _unavailable(f"no {missing} on PATH: install Node.js {NODE_MAJOR}+ with npm (scripts/test does in CI)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    if major is None or int(major.group(1)) < NODE_MAJOR:
        _unavailable(f"node {version or '(no version)'} is older than {NODE_MAJOR}, the package's oldest")
    _npm_ci(npm)
    return node


def run_node(node: str, *args: str, redis_url: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "NO_COLOR": "1"}
    return subprocess.run([node, *args], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=RUN_SECONDS)


def steps(done: subprocess.CompletedProcess[str], last: str = "end") -> dict[str, dict]:
    """A script's JSON lines, by step; fail with its output unless it exited 0 having printed ``last``."""
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_step = {line.pop("step"): line for line in lines}
    assert done.returncode == 0 and last in by_step, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return by_step


def epoch_ms(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000


@pytest.fixture
def sim() -> Iterator[Simulator]:
    # The default models and a thinking one (the simulator's qwen3 reasons first), for the thinking stream.
    with Simulator(SimulatorConfig(port=0, models=[*DEFAULT_MODELS, "qwen3:latest"])) as simulator:
        yield simulator


def test_the_packages_own_tests_pass(node: str) -> None:
    # Loading by require and by import, and what submit() refuses (no Redis needed).
    done = run_node(node, "--test", "--test-reporter=tap", "test/client.test.mjs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^# fail 0$", done.stdout, re.M) and re.search(r"^# pass [1-9]\d*$", done.stdout, re.M)


def test_a_node_producer_submits_streams_and_waits_on_real_jobs(
    node: str, service, redis_url: str, r: redis.Redis
) -> None:
    service()
    done = run_node(node, "test/scenario.mjs", redis_url=redis_url)
    s = steps(done)

    chat = s["chat"]["result"]
    assert chat["success"] and chat["jobId"] == s["chat"]["id"] and chat["correlationId"] == "node-corr-1"
    assert chat["model"].startswith("llama3.2") and chat["response"]["message"]["content"]
    completed = [e for e in events(r, "llm.request.completed") if e["jobId"] == s["chat"]["id"]]
    assert [(e["userId"], e["correlationId"]) for e in completed] == [("node-scenario", "node-corr-1")]

    # The streamed pieces are the result's text, in order, whole.
    stream = s["stream"]
    assert len(stream["pieces"]) > 1 and "\f" not in stream["pieces"]
    assert "".join(stream["pieces"]) == stream["result"]["response"]["message"]["content"]

    # A thinking model's reasoning comes in its own field, apart from the answer, on both sides.
    thinking = s["thinking"]
    message = thinking["result"]["response"]["message"]
    assert {c["type"] for c in thinking["chunks"]} == {"chunk"}
    assert message["thinking"] and "".join(c.get("thinking", "") for c in thinking["chunks"]) == message["thinking"]
    assert "".join(c["content"] for c in thinking["chunks"]) == message["content"]

    embeddings = s["embeddings"]
    assert embeddings["success"] and len(embeddings["dims"]) == 2 and embeddings["dims"][0] > 0
    assert embeddings["dims"][0] == embeddings["dims"][1]

    failure = s["failure"]["result"]
    assert not failure["success"] and failure["errorType"] == "model" and "not found" in failure["error"]
    assert failure["jobId"] == s["failure"]["id"] and failure["retryCount"] == 0
    assert s["stream-failure"] | {"id": None} == {
        "id": None,
        "thrown": "JobFailed",
        "errorType": "model",
        "resultJobId": s["stream-failure"]["id"],
    }

    # The wait ended with null at its deadline; the job is still queued, as the Node client wrote it,
    # and the workers' own decoder takes it.
    timeout = s["timeout"]
    assert timeout["result"] is None and timeout["elapsedMs"] >= 500
    [raw] = r.lrange(UNSERVED, 0, -1)
    job = json.loads(raw)
    assert list(job)[:4] == ["id", "type", "userId", "request"]  # id first (docs/protocol.md, Payloads)
    assert job == {
        "id": timeout["id"],
        "type": "chat",
        "userId": "node-scenario",
        "request": {"messages": [{"role": "user", "content": "Nobody takes this"}]},
        "priority": 7,
        "createdAt": job["createdAt"],
        "retryCount": 0,
        "model": "llama3.2",
        "correlationId": "node-corr-unserved",
        "timeout": 1234,
        "maxRetries": 2,
        "tenant": "acme",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", job["createdAt"])
    decoded = decode(raw, Settings())
    assert decoded.timeout == 1.234 and decoded.max_attempts == 3 and decoded.job.user_id == "node-scenario"

    # A delayed job waited in the delayed set, and no worker started it before it was due.
    delayed = s["delayed"]
    assert delayed["queuedDelayed"] >= 1 and delayed["result"]["success"]
    assert epoch_ms(delayed["result"]["startedAt"]) >= delayed["notBeforeMs"]

    parallel = s["parallel"]
    assert parallel["successes"] == [True] * 4 and parallel["jobIds"] == parallel["ids"]

    assert s["refused"]["thrown"] == "TypeError" and "model" in s["refused"]["message"]
    assert "secret" not in s["refused"]["message"]

    answered = ("chat", "stream", "thinking", "embeddings", "failure", "stream-failure", "delayed")
    assert_each_answered_once(r, [s[step]["id"] for step in answered] + parallel["ids"])


def _holder(svc, r: redis.Redis, job_id: str) -> int | None:
    """The pid of this service's worker that holds ``job_id`` now, if any."""
    for pid in svc.worker_pids(r):
        if job_id in held_by(r, f"{svc.env['WORKER_ID']}:{pid}"):
            return pid
    return None


def _chunks(r: redis.Redis, job_id: str) -> int:
    return sum(1 for _, fields in r.xrange(f"llm:stream:{job_id}") if fields.get(b"event") == b"chunk")


def test_a_node_reader_is_told_to_start_over_when_the_worker_streaming_to_it_dies(
    node: str, service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # A slow stream (40 tokens, 100 ms each), and heartbeats that outlive the test: the supervisor's own
    # reaping hands the job back (as in test_edges.py, from Python)
    sim.config.token_ms = 100
    sim.config.reply_tokens = 40
    svc = service(WORKER_POOLS="llm-chat=2", JOB_MAX_CRASHES="5", WORKER_HEARTBEAT_TIMEOUT="600000")
    job_id = f"node-follow-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "REDIS_URL": redis_url, "LLM_JOB_ID": job_id}
    with subprocess.Popen(
        [node, "test/follow.mjs"], cwd=PACKAGE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            eventually(lambda: _chunks(r, job_id) >= 3, timeout=30, what="three chunks streamed")
            pid = eventually(lambda: _holder(svc, r, job_id), timeout=15, what="the job held by a worker")
            assert _chunks(r, job_id) < 40  # still mid-stream: the kill cuts it short
            os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=RUN_SECONDS)
        finally:
            if proc.poll() is None:
                proc.kill()
    followed = steps(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), last="followed")["followed"]
    # The reader got the first run's text, one "\f", then the second run's text whole: the result's.
    pieces, result = followed["pieces"], followed["result"]
    assert pieces.count("\f") == 1 and pieces.index("\f") >= 3
    assert result["success"] and result["workerId"] != f"{svc.env['WORKER_ID']}:{pid}"
    assert "".join(pieces[pieces.index("\f") + 1 :]) == result["response"]["message"]["content"]
    assert_each_answered_once(r, [job_id])


def test_the_readme_examples_run(node: str, service, redis_url: str) -> None:
    example = (PACKAGE / "examples" / "chat.mjs").read_text()
    assert example in (PACKAGE / "README.md").read_text(), "clients/node/README.md shows examples/chat.mjs as it is"
    # The project README's, in "Producing jobs", against this test's Redis rather than the default one.
    section = (ROOT / "README.md").read_text().split("## Producing jobs", 1)[1]
    snippet = section.split("```js\n", 1)[1].split("```", 1)[0]
    assert "redis://127.0.0.1:6379/0" in snippet
    service()
    done = run_node(node, "examples/chat.mjs", redis_url=redis_url)
    assert done.returncode == 0 and done.stdout.strip(), done.stdout + done.stderr
    code = snippet.replace("redis://127.0.0.1:6379/0", redis_url)
    done = run_node(node, "--input-type=module", "--eval", code, redis_url=redis_url)  # resolves the package by name
    assert done.returncode == 0 and done.stdout.strip(), done.stdout + done.stderr
