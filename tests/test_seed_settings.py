"""Settings of the service llm-worker replaces: each honoured, or named with what to use instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import eventually

from llm_worker.settings import config

SEED = [  # the replaced service's settings llm-worker had ignored in silence (issue 15)
    "QUEUE_REMOVE_ON_COMPLETE",
    "QUEUE_REMOVE_ON_FAIL",
    "ENABLE_STREAMING",
    "ENABLE_GPU_OPTIMIZATION",
    "MEMORY_LIMIT",
    "GPU_MEMORY_LIMIT",
    "METRICS_ENABLED",
    "ENABLE_PERFORMANCE_MONITORING",
    "PERFORMANCE_SAMPLE_RATE",
    "REQUEST_QUEUE_SIZE",
    "MEMORY_CLEANUP_INTERVAL",
    "ENABLE_DEAD_LETTER_QUEUE",
    "ERROR_RETRY_ATTEMPTS",
    "ERROR_RETRY_DELAY",
    "ENABLE_ERROR_NOTIFICATIONS",
    "ENABLE_REQUEST_VALIDATION",
]
DECLARED = {decl.env for decl in config.declarations()}


def test_each_seed_setting_is_either_read_or_named_with_what_to_use() -> None:
    for name in SEED:
        assert (name in DECLARED) != (name in config.UNUSED_SETTINGS), name
    assert "QUEUE_REMOVE_ON_FAIL" in DECLARED
    assert set(config.UNUSED_SETTINGS) <= set(SEED)


def test_what_to_use_instead_names_only_settings_that_exist() -> None:
    for name, instead in config.UNUSED_SETTINGS.items():
        named = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", instead))
        assert named <= DECLARED, (name, named - DECLARED)


def test_the_readme_lists_every_unused_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, instead in config.UNUSED_SETTINGS.items():
        assert "| `%s` | %s |" % (name, instead.replace("|", "\\|")) in readme, name


def test_each_unused_setting_that_is_set_is_named_and_no_other() -> None:
    assert config.unused_settings({"ERROR_RETRY_DELAY": "2000", "QUEUE_DELAY": "1000"}) == [
        "not used by llm-worker: ERROR_RETRY_DELAY; use " + config.UNUSED_SETTINGS["ERROR_RETRY_DELAY"]
    ]
    assert config.unused_settings({"QUEUE_DELAY": "1000"}) == []


def test_check_config_prints_a_line_for_each_unused_setting_set(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    env.update({name: "1" for name in config.UNUSED_SETTINGS})
    done = subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", "check-config"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    for name, instead in config.UNUSED_SETTINGS.items():
        assert f"not used by llm-worker: {name}; use {instead}\n" in done.stderr
    assert "settings are valid" in done.stderr


def test_queue_remove_on_fail_is_a_setting_with_an_inspectable_default() -> None:
    settings = config.load({}).settings
    assert settings.queue.remove_on_fail == 10_000
    assert config.load({"QUEUE_REMOVE_ON_FAIL": "0"}).settings.queue.remove_on_fail == 0  # unbounded
    with pytest.raises(config.SettingError, match="QUEUE_REMOVE_ON_FAIL"):
        config.load({"QUEUE_REMOVE_ON_FAIL": "-1"})


def test_a_run_logs_each_unused_setting_at_start(service) -> None:
    svc = service(WORKER_POOLS="llm-chat=1", ENABLE_STREAMING="true", MEMORY_LIMIT="8192")
    for name in ("ENABLE_STREAMING", "MEMORY_LIMIT"):
        line = f"not used by llm-worker: {name}; use {config.UNUSED_SETTINGS[name]}"
        eventually(lambda line=line: line in svc.log_path.read_text(), timeout=10, what=line)
