"""The example plugins are real: the guide's modules load, and the example package works as a third party's would.

examples/llm-worker-statsd is what docs/plugins.md builds. Here it is
installed next to llm-worker (both non-editable, from copies of their source
trees, so the build leaves nothing in the checkout) into a new virtual
environment, found by that environment's ``llm-worker plugins``, and run by
its ``llm-worker run`` against this test's Redis and simulator, with its
StatsD datagrams caught on a UDP socket the test binds.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import urllib3
from support import chat, client_for

from llm_worker.devtools.harness import Service
from llm_worker.devtools.simulator import Simulator
from llm_worker.plugin import spec as hookspecs
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.settings import config

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "llm-worker-statsd"
GUIDE = ROOT / "docs" / "plugins.md"
# What a build needs of a source tree, without what a checkout also holds.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".demo",
    ".bench",
    ".*_cache",
    ".hypothesis",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    "tests",
    "examples",
)
# The environment of this run that must not reach the new one: our settings, our import path, our venv.
OURS = {d.env for d in config.declarations()} | {
    "LLM_WORKER_PLUGINS",
    "LLM_WORKER_DISABLE_PLUGINS",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "PIP_NO_CACHE_DIR",
    "PIP_REQUIRE_VIRTUALENV",
}
PREFIX = "ci"
TOKEN = "example-plugin-token"


def needs_venv() -> None:
    """Skip without ``python -m venv`` here; fail in CI (``CI=true``), where the test must run."""
    if importlib.util.find_spec("venv") is not None and importlib.util.find_spec("ensurepip") is not None:
        return
    why = "python -m venv is unavailable here (no venv or ensurepip module; Debian's python3-venv)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {why}", pytrace=False)
    pytest.skip(why)


@pytest.mark.slow
def test_the_statsd_example_installs_lists_and_sends_metrics_from_a_real_service(
    tmp_path: Path, redis_url: str, sim: Simulator
) -> None:
    needs_venv()
    # Given: llm-worker and the example, pip-installed into a new virtual environment.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in OURS and not k.startswith("STATSD_")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "/usr/bin:/bin")])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    shutil.copytree(ROOT, tmp_path / "llm-worker", ignore=NOT_SOURCE)
    shutil.copytree(EXAMPLE, tmp_path / "llm-worker-statsd", ignore=NOT_SOURCE)
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            str(tmp_path / "llm-worker"),
            str(tmp_path / "llm-worker-statsd"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr

    # Then: its `llm-worker plugins` finds the plugin by its entry point, with its distribution and hooks.
    listed = subprocess.run(
        [str(venv / "bin" / "llm-worker"), "plugins"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert any(
        re.fullmatch(r"statsd\s+llm-worker-statsd 0\.1\.0\s+llm_worker_record, llm_worker_worker_started", row)
        for row in rows
    ), listed.stdout
    assert any(re.match(r"ollama\s+llm-worker 0\.1\.0\s", row) for row in rows), (
        listed.stdout
    )  # installed, not our tree

    # When: its `llm-worker run` serves a chat job with STATSD_PORT at a socket of ours.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as statsd:
        statsd.bind(("127.0.0.1", 0))
        # That environment's own `llm-worker`, with none of our settings, import path or venv.
        service = Service(
            {
                "REDIS_URL": redis_url,
                "OLLAMA_BASE_URL": sim.url,
                "WORKER_ID": f"t{uuid.uuid4().hex[:8]}",
                "WORKER_POOLS": "llm-chat=1",
                "ADMIN_TOKEN": TOKEN,
                "LOG_LEVEL": "info",
                "STATSD_HOST": "127.0.0.1",
                "STATSD_PORT": str(statsd.getsockname()[1]),
                "STATSD_PREFIX": PREFIX,
            },
            log_path=tmp_path / "service.log",
            command=[str(venv / "bin" / "llm-worker")],
            base_env=env,
            cwd=tmp_path,
        )
        try:
            service.start(timeout=60)
            client = client_for(redis_url)
            result = client.wait(chat(client), timeout=30)
            assert result is not None and result["success"], result

            # Then: the worker sent the job's counter and timer in one datagram, tagged with its queue, model and type.
            tags = f"#queue:llm-chat,model:{result['model']},type:chat"
            completed = f"{PREFIX}.jobs.completed:1|c|{tags}"
            counter, duration = datagram_with(statsd, completed)
            assert counter == completed
            ms = re.fullmatch(rf"{PREFIX}\.job\.duration:(\d+\.\d{{3}})\|ms\|{tags}", duration)
            assert ms is not None, duration
            assert float(ms.group(1)) >= result["processingTime"] - 1  # milliseconds, take to outcome

            # And: the HTTP process's sink sends breaker events (an operator forcing one open).
            forced = urllib3.request(
                "POST",
                service.url + "/admin/breakers/force-open?key=ollama:llama3.2",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert forced.status == 200, forced.data
            assert datagram_with(statsd, f"{PREFIX}.breaker.opened:1|c|#model:llama3.2") == [
                f"{PREFIX}.breaker.opened:1|c|#model:llama3.2"
            ]
        except BaseException:
            print(f"---- service log (last lines) ----\n{service.tail(60)}")
            raise
        finally:
            service.stop()


def datagram_with(sock: socket.socket, line: str, timeout: float = 15.0) -> list[str]:
    """The lines of the first datagram on ``sock`` that holds ``line``; datagrams before it are passed over."""
    seen: list[list[str]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no datagram with {line!r} within {timeout}s; got {seen}"
        sock.settimeout(left)
        try:
            lines = sock.recv(65536).decode().splitlines()
        except socket.timeout:
            continue
        if line in lines:
            return lines
        seen.append(lines)


# ---- the guide's code is the real thing -----------------------------------------------


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def test_the_guides_plugin_modules_load_and_cover_every_hook(tmp_path: Path) -> None:
    implemented: set[str] = set()
    modules = [block for block in code_blocks("python") if "@hookimpl" in block]
    for index, source in enumerate(modules):
        path = tmp_path / f"guide_example_{index}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # load() checks what start-up checks: every hook name, every parameter name.
        manager = PluginManager(disabled=set()).load([Found(path.stem, module, "docs/plugins.md")])
        implemented.update(manager.plugins()[0].hooks)
    specs = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("llm_worker_")}
    assert implemented == specs, f"hooks without an example in the guide: {specs - implemented}"


def test_the_tutorial_shows_the_example_package_as_it_is() -> None:
    blocks = [block.strip() for block in code_blocks("python") + code_blocks("toml")]
    for path in (EXAMPLE / "pyproject.toml", EXAMPLE / "llm_worker_statsd" / "__init__.py"):
        assert path.read_text().strip() in blocks, f"docs/plugins.md shows another {path.relative_to(ROOT)}"
