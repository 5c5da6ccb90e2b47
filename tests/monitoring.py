"""The Prometheus rules and the Grafana dashboard in conf/, as the tests read them, and promtool to check them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "conf" / "prometheus" / "llm-worker.rules.yml"
RULE_TESTS = ROOT / "conf" / "prometheus" / "llm-worker.rules.test.yml"
DASHBOARD = ROOT / "conf" / "grafana" / "llm-worker.json"


def promtool() -> str:
    """Debian's prometheus package has it: without it, skip here and fail in CI (scripts/test installs it there)."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed, and CI must check the rules and the dashboard with it")
        pytest.skip("promtool is not installed (Debian's prometheus package has it)")
    return found


def run_promtool(*args: str, cwd: Path = ROOT) -> None:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard_queries() -> list[tuple[str, str]]:
    """Every query of the dashboard, as (where it is, the query): panel targets and template variables."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out
