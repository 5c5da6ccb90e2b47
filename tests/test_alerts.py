"""The Prometheus rules and the Grafana dashboard: checked by promtool, and read only what a live service exports.

conf/prometheus/llm-worker.rules.yml is checked and unit-tested with the real
promtool (Debian's prometheus package; these tests skip without it, and fail in
CI). Every metric name in a rule or a dashboard query must be in the /metrics of
a running ``llm-worker run``, made to do what brings each family's series out.
"""

from __future__ import annotations

import json

import pytest
import urllib3
import yaml
from fake_pynvml import gpu
from monitoring import RULE_TESTS, RULES, alerts, dashboard_queries, recorded, rules, run_promtool
from prometheus_client.parser import text_string_to_metric_families
from promql_names import grafana_query_names, metric_names
from support import chat, client_for, eventually, wait_all

from llm_worker.devtools.simulator import Fault, Simulator

SEVERITIES = {"critical", "warning"}

# Series Prometheus makes itself, not the service.
PROMETHEUS_SERIES = {"up": "each scrape's own", "ALERTS": "alerts pending and firing, from the rules"}
# Families every scrape declares (HELP and TYPE) whose series exist only while something is going on.
MAY_BE_ABSENT = {"llm_worker_model_loading_seconds": "one series per model load in progress, none between loads"}
# Which sample names each family type exposes (prometheus_client names a counter family without `_total`).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "info": ("_info",),
}


# ---- promtool --------------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    run_promtool("check", "rules", str(RULES))


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    # The test file names its rule file relative to itself.
    run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)


def test_every_alert_says_how_severe_what_it_means_and_what_to_do() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), names
    for rule in alerts():
        assert rule["alert"].startswith("LLMWorker"), rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        notes = rule.get("annotations", {})
        assert {"summary", "description", "runbook"} <= set(notes), rule["alert"]
        assert all(len(notes[k].split()) >= 3 for k in ("summary", "description", "runbook")), rule["alert"]


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])
    ]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "alerts no unit test fires"
    assert names - silent == set(), "alerts no unit test holds back (the `for:` or a threshold's edge)"
    assert (fired | silent) - names == set(), "unit tests of alerts that do not exist"


# ---- the metric names in PromQL ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job="llm-worker"} == 0', {"up"}),
        ("rate(llm_worker_jobs_total[5m])", {"llm_worker_jobs_total"}),
        (  # aggregation with `by` first, a histogram, label matchers with Grafana variables, and Grafana's interval
            'histogram_quantile(0.99, sum by (le, queue) (rate(llm_worker_job_duration_seconds_bucket{job=~"$job", '
            'queue=~"${queue}"}[$__rate_interval])))',
            {"llm_worker_job_duration_seconds_bucket"},
        ),
        ("sum(rate(a_total[5m])) by (queue) / ignoring(outcome) group_left(model) b", {"a_total", "b"}),
        ("a * on (instance) group_left c", {"a", "c"}),  # group_left without a label list: `c` is the operand
        ("a > bool 0 and b unless c or d", {"a", "b", "c", "d"}),
        ("max_over_time(deriv(recorded:series:max[10m])[1h:5m])", {"recorded:series:max"}),
        ("x offset 5m", {"x"}),
        ("x @ start()", {"x"}),
        ("x @ 1609746000 + Inf - NaN", {"x"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
        ('count_values("version", llm_worker_build_info)', {"llm_worker_build_info"}),
        ("topk(5, x) + quantile(0.9, y) + SUM BY (q) (z)", {"x", "y", "z"}),
        ('{__name__="named_by_matcher", job="j"}', {"named_by_matcher"}),
        ('{"quoted.utf8", job="j"}', {"quoted.utf8"}),
        ("vector(0) + time() + pi() + 1e3 + 0x1f + 1h30m", set()),
        ("# a comment naming not_a_metric\nreal_metric", {"real_metric"}),
        ('sum without (state) (x{state=~"waiting|parked"})', {"x"}),
        ("changes(llm_worker_start_time_seconds[30m]) > 2", {"llm_worker_start_time_seconds"}),
        ('absent(up{job="x", instance="y:1"})', {"up"}),
        ("-x ^ 2 % 3", {"x"}),
    ],
)
def test_metric_names_are_told_from_functions_keywords_labels_and_strings(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("label_values(llm_worker_build_info, job)", {"llm_worker_build_info"}),
        ('label_values(llm_worker_queue_jobs{job=~"$job", instance=~"$instance"}, queue)', {"llm_worker_queue_jobs"}),
        ("label_values(instance)", set()),
        ("query_result(topk(3, sum by (model) (rate(llm_worker_tokens_total[1h]))))", {"llm_worker_tokens_total"}),
        ("metrics(llm_worker_.*)", set()),
        ("sum(up)", {"up"}),
    ],
)
def test_grafana_variable_queries_name_their_metric(query: str, names: set[str]) -> None:
    assert grafana_query_names(query) == names


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("rat(x[5m])", "unknown function 'rat'"),
        ('{__name__=~"llm_worker_.*"}', "regular expression"),
        ("sum(x[5m]", "unclosed"),
        ('x{a="b"]', "unbalanced"),
    ],
)
def test_what_cannot_be_told_is_refused_rather_than_guessed(expr: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        metric_names(expr)


# ---- against a live service ------------------------------------------------------------------------


def used_names() -> dict[str, list[str]]:
    """Each metric name the rules and the dashboard read, with where; recorded series by what they read."""
    used: dict[str, list[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, []).append(f"rule {rule.get('alert') or rule.get('record')}")
    for where, query in dashboard_queries():
        for name in grafana_query_names(query):
            used.setdefault(name, []).append(f"dashboard {where}")
    made = recorded()
    missing = {name: where for name, where in used.items() if ":" in name and name not in made}
    assert not missing, f"recorded series no rule records: {missing}"
    return {name: where for name, where in used.items() if name not in made and name not in PROMETHEUS_SERIES}


def exposition(svc) -> tuple[set[str], dict[str, str]]:  # type: ignore[no-untyped-def]
    """Sample names in the service's /metrics, and every declared family's type by name."""
    text = urllib3.request("GET", svc.url + "/metrics").data.decode()
    families = list(text_string_to_metric_families(text))
    return {s.name for f in families for s in f.samples}, {f.name: f.type for f in families}


def declared(name: str, families: dict[str, str]) -> bool:
    """Whether ``name`` is a sample name of a declared family of the right type (present or not)."""
    return any(name == family + suffix for family, kind in families.items() for suffix in SUFFIXES.get(kind, ("",)))


def series_missing(svc, used: dict[str, list[str]], allowed: frozenset[str] = frozenset()) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """The used names without a sample in /metrics (but those ``allowed`` and MAY_BE_ABSENT), once none is
    missing or after 30 s: the HTTP process's sampler reads the provider, the GPU and Redis on an interval."""
    skip = allowed | set(MAY_BE_ABSENT)

    def missing() -> dict[str, list[str]]:
        samples, _ = exposition(svc)
        return {name: where for name, where in used.items() if name not in samples and name not in skip}

    try:
        eventually(lambda: not missing(), timeout=30, interval=0.5, what="every series the rules and dashboard read")
    except AssertionError:
        pass
    return missing()


def test_a_name_is_exported_only_with_the_suffix_its_family_type_gives() -> None:
    text = (
        "# HELP c_total A counter\n# TYPE c_total counter\nc_total 1\n"
        "# HELP h A histogram\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 1\nh_count 1\nh_sum 0.5\n'
        "# HELP g A gauge with no series now\n# TYPE g gauge\n"
    )
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert [declared(n, families) for n in ("c_total", "h_bucket", "h_sum", "h_count", "g")] == [True] * 5
    assert [declared(n, families) for n in ("c", "h", "g_total", "c_total_total", "h_bucket_bucket")] == [False] * 5


GPU = {"gpus": [gpu(0)]}  # tests/fake_pynvml.py's healthy GPU, for the service's sampler to read


def test_every_metric_the_rules_and_the_dashboard_read_is_in_a_live_metrics(
    service, sim: Simulator, redis_url: str
) -> None:
    used = used_names()
    assert "llm_worker_jobs_total" in used and "llm_worker_gpu_memory_used_bytes" in used  # the extraction works
    svc = service(
        HOST_SAMPLE_INTERVAL="200",
        OLLAMA_HEALTH_CHECK_INTERVAL="500",
        MODEL_MANAGER_INTERVAL="200",  # what the provider has loaded, read soon after each load
        LLM_WORKER_NVML_MODULE="fake_pynvml",  # tests/fake_pynvml.py: a GPU on a machine without one
        FAKE_NVML_SCENARIO=json.dumps(GPU),
        RATE_LIMIT_RPM="ollama=100000",  # a budget: the rate-limit families get their provider's series
    )
    client = client_for(redis_url)
    # Jobs of every pool, so that outcomes, histograms, tokens, model loads and loaded models show.
    wait_all(
        client,
        [
            chat(client),
            client.submit("generate", {"prompt": "Why?"}, model="llama3.2"),
            client.submit("embeddings", {"input": "a text"}, model="nomic-embed-text"),
        ],
    )
    # The provider's 429: a rate-limited call (the job waits in the delayed set and runs later).
    sim.set_faults([Fault(reason="rate_limit", count=1)])
    chat(client, "A rate-limited question")
    # Everything but what needs the provider gone, before it goes: the loaded models' memory is read from it.
    gone_only = frozenset({"llm_worker_provider_reachable", "llm_worker_provider_outages_total"})
    absent = series_missing(svc, used, allowed=gone_only)
    assert not absent, f"series the rules or the dashboard read and a live /metrics lacks: {absent}"
    # The provider gone: the workers' connections refused is what brings out provider_reachable and outages.
    sim.stop()
    chat(client, "A question for a provider that is gone")
    absent = series_missing(svc, used)
    assert not absent, f"series the rules or the dashboard read and a live /metrics lacks: {absent}"
    _, families = exposition(svc)
    for name in MAY_BE_ABSENT:
        assert declared(name, families), f"{name} is not even declared in /metrics"
    undeclared = {name: where for name, where in used.items() if not declared(name, families)}
    assert not undeclared, f"names no family of /metrics exports: {undeclared}"
