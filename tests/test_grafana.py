"""conf/grafana/llm-worker.json is a dashboard Grafana 10 and 11 import as is.

The metric names its queries read are checked against a live /metrics in
test_alerts.py; here, its shape, and its PromQL parsed by promtool.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from monitoring import DASHBOARD, dashboard_queries, run_promtool
from promql_names import grafana_query_names

PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "table"}  # core panels: no plugin to install
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def board() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_has_what_an_import_needs() -> None:
    b = board()
    assert 36 <= b["schemaVersion"] <= 41  # Grafana 10.0 wrote 38, 11.x writes 39 to 41
    assert b["uid"] and b["title"] and b["id"] is None  # Grafana gives the id on import
    variables = {v["name"]: v for v in b["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "queue"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE, name
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    assert variables["queue"]["multi"] and variables["queue"]["includeAll"]


def test_every_panel_has_a_unique_id_a_place_and_prometheus_queries() -> None:
    panels = board()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert p["type"] in PANEL_TYPES, (p["id"], p["type"])
        pos = p["gridPos"]
        assert set(pos) == {"h", "w", "x", "y"} and pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p
        if p["type"] == "row":
            assert p["title"] and p["panels"] == [] and not p["collapsed"], p["id"]
            continue
        assert p["title"] and p.get("description"), p["id"]
        assert p["datasource"] == DATASOURCE and p["targets"], p["id"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["id"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip(), (p["id"], t["refId"])


def test_no_two_panels_overlap() -> None:
    cells: dict[tuple[int, int], int] = {}
    for p in board()["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap at {(x, y)}"
                cells[(x, y)] = p["id"]


def test_the_dashboard_shows_what_an_operator_looks_for() -> None:
    read = {name for _, query in dashboard_queries() for name in grafana_query_names(query)}
    for name in (
        "llm_worker_jobs_total",
        "llm_worker_job_duration_seconds_bucket",
        "llm_worker_queue_wait_seconds_bucket",
        "llm_worker_breaker_state",
        "llm_worker_pool_paused",
        "llm_worker_provider_calls_in_flight",
        "llm_worker_provider_calls_limit",
        "llm_worker_model_loads_total",
        "llm_worker_model_unloads_total",
        "llm_worker_models_loaded",
        "llm_worker_model_memory_bytes",
        "llm_worker_gpu_memory_used_bytes",
        "llm_worker_gpu_utilization_ratio",
        "llm_worker_worker_crashes_total",
        "llm_worker_jobs_reclaimed_total",
        "llm_worker_queue_jobs",
        "llm_worker_delayed_jobs",
        "llm_worker_dead_letter_jobs",
        "llm_worker_rate_limited_total",
        "llm_worker_rate_limit_refusals_total",
    ):
        assert name in read, name
    quantiles = [q for _, q in dashboard_queries() if "histogram_quantile" in q]
    assert quantiles and all(re.search(r"rate\(\w+_bucket\{[^}]*\}\[5m\]\)", q) for q in quantiles), quantiles


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Grafana fills in its variables before Prometheus sees a query; promtool checks the PromQL of each,
    # given as a recording rule, with them filled in as Grafana would.
    def filled(query: str) -> str:
        query = re.sub(r"\$\{?__(rate_)?interval\}?", "5m", query)
        return re.sub(r"\$\{?\w+\}?", ".*", query)

    rules = [
        {"record": f"dashboard:query_{i}", "expr": filled(q)}
        for i, (_, q) in enumerate(dashboard_queries())
        if not q.startswith("label_values(")
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))
