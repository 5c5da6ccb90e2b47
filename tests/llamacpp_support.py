"""llama-cpp-python's OpenAI-compatible server, for tests against a real inference server.

scripts/llamacpp makes the server's own environment (llama-cpp-python[server]
and gguf, from a cached wheel) and scripts/test exports its python as
LLAMACPP_PYTHON; without that variable the default place of that environment
is looked at. Absent, the tests skip, saying how to get it; in CI
(CI=true) they fail instead, since there it must be there.

The server serves two models that llamacpp_model.py writes, both tiny with
random weights: ``tiny`` (pooled embeddings) and ``tiny-nopool`` (none).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).parent
MODEL_SCRIPT = HERE / "llamacpp_model.py"
CHAT = "tiny"  # the model's alias on the server
NOPOOL = "tiny-nopool"
CONTEXT = 2048  # tokens: the server's n_ctx for both models
START_SECONDS = 120.0  # importing llama_cpp and loading the model take a second or two; a loaded machine more
# llama_cpp.server, leaving as soon as its stdin closes: when the test process ends, however it ends,
# so that no server outlives the tests on a shared machine.
LAUNCH = (
    "import os, runpy, sys, threading\n"
    "threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


def default_python() -> Path:
    """Where scripts/llamacpp puts the environment's python unless told otherwise."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = Path(os.environ.get("LLM_WORKER_CACHE") or cache / "llm-worker")
    return Path(os.environ.get("LLAMACPP_HOME") or base / "llamacpp") / "venv" / "bin" / "python"


def server_python() -> Path:
    """The python of llama-cpp-python's environment; skip (fail in CI) when there is none."""
    named = os.environ.get("LLAMACPP_PYTHON")
    python = Path(named) if named else default_python()
    if python.is_file() and os.access(python, os.X_OK):
        return python
    why = (
        f"no llama-cpp-python environment at {python} (LLAMACPP_PYTHON={named!r}): scripts/test prepares it"
        " with scripts/llamacpp (its first run builds llama.cpp, minutes)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {why}", pytrace=False)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's server (``python -m llama_cpp.server``) on a free port of 127.0.0.1, its log in ``workdir``.

    The settings are the server's defaults where the tests are about them
    (``interrupt_requests`` on: a newer request stops a running stream), and
    small elsewhere: one thread, a context of CONTEXT tokens.
    """

    def __init__(self, python: Path, workdir: Path) -> None:
        self.python = python
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        # A third name for the tiny model, this server's alone: the proof that the server that answers on the
        # port is this one, and not another test process's that took the port first.
        self.marker = f"instance-{uuid.uuid4().hex[:12]}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        models = {CHAT: self.workdir / "tiny.gguf", NOPOOL: self.workdir / "tiny-nopool.gguf"}
        for alias, path in models.items():
            flags = ["--no-pooling"] if alias == NOPOOL else []
            subprocess.run([str(self.python), str(MODEL_SCRIPT), str(path), *flags], check=True, timeout=120)
        models[self.marker] = models[CHAT]  # loaded only if asked for: the server loads its first model alone
        for _ in range(3):  # a port taken between our look and the server's bind: once more, elsewhere
            self.port = free_port()
            config = self.workdir / "server.json"
            config.write_text(
                json.dumps(
                    {
                        "host": "127.0.0.1",
                        "port": self.port,
                        "interrupt_requests": True,
                        "models": [
                            {
                                "model": str(path),
                                "model_alias": alias,
                                "n_ctx": CONTEXT,
                                "n_threads": 1,
                                "n_threads_batch": 1,
                                "embedding": True,
                                "verbose": False,
                                "seed": 1,
                            }
                            for alias, path in models.items()
                        ],
                    }
                )
            )
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.python), "-c", LAUNCH, "--config_file", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.PIPE,
                    start_new_session=True,
                    cwd=self.workdir,
                )
            if self._wait_ready():
                return self
            self.stop()
            if "address already in use" not in self.tail().lower():
                break
        raise RuntimeError(f"llama-cpp-python's server did not start; its log:\n{self.tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)  # no proxy, whatever the environment
            try:
                conn.request("GET", "/v1/models")
                reply = conn.getresponse()
                if reply.status == 200 and self.marker in reply.read().decode(errors="replace"):
                    return True
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the server's cue to leave
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
