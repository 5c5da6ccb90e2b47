"""GPU readings through NVML, and logs, as a running service shows them.

NVML cannot exist here (no GPU), so the service is pointed at tests/fake_pynvml.py
through LLM_WORKER_NVML_MODULE, with its scenario in FAKE_NVML_SCENARIO.
"""

from __future__ import annotations

import msgspec
import urllib3
from fake_pynvml import GiB, gpu
from support import chat, client_for, eventually, wait_all
from test_http import FAST, scrape, value


def fake_nvml(**scenario: object) -> dict[str, str]:
    return {
        "LLM_WORKER_NVML_MODULE": "fake_pynvml",
        "FAKE_NVML_SCENARIO": msgspec.json.encode(scenario).decode(),
        **FAST,
    }


def test_gpu_readings_reach_metrics_and_status(service) -> None:
    ollama = {"pid": 4242, "name": "/usr/local/bin/ollama", "used": 6 * GiB}
    svc = service(**fake_nvml(gpus=[gpu(0, processes=[ollama]), gpu(1, unsupported=["power", "energy"])]))
    samples = eventually(
        lambda: (lambda s: s if value(s, "llm_worker_gpu_collector_up") else None)(scrape(svc)), what="GPU readings"
    )
    first = {"gpu": "0", "uuid": "GPU-00000000-fake-4000-8000-000000000000"}
    second = {"gpu": "1", "uuid": "GPU-00000001-fake-4000-8000-000000000001"}
    assert value(samples, "llm_worker_gpu_utilization_ratio", **first) == 0.5
    assert value(samples, "llm_worker_gpu_memory_total_bytes", **first) == 80 * GiB
    assert value(samples, "llm_worker_gpu_memory_used_bytes", **second) == 10 * GiB
    assert value(samples, "llm_worker_gpu_ollama_memory_bytes", **first) == 6 * GiB
    assert ("llm_worker_gpu_power_watts", tuple(sorted(first.items()))) in samples
    # Partly unsupported: GPU 1 reports no power or energy, and so has no such series.
    assert ("llm_worker_gpu_power_watts", tuple(sorted(second.items()))) not in samples
    assert ("llm_worker_gpu_energy_joules_total", tuple(sorted(second.items()))) not in samples
    status = svc.get("/status")[1]["gpu"]
    assert (
        status["collectorUp"]
        and [g["index"] for g in status["gpus"]] == [0, 1]
        and status["gpus"][1]["powerWatts"] is None
    )


def test_no_driver_is_a_normal_state_one_log_line_no_crash(service) -> None:
    svc = service(**fake_nvml(fail_init="driver_not_loaded"))
    samples = eventually(
        lambda: (lambda s: s if ("llm_worker_gpu_collector_up", ()) in s else None)(scrape(svc)), what="a scrape"
    )
    eventually(lambda: "Driver Not Loaded" in svc.tail(200), what="the reason logged")
    assert value(scrape(svc), "llm_worker_gpu_collector_up") == 0
    assert not any(name.startswith("llm_worker_gpu_memory") for name, _ in samples)
    assert svc.get("/status")[1]["gpu"]["collectorUp"] is False
    log = svc.tail(500)
    assert log.count("Driver Not Loaded") == 1 and "Traceback" not in log


def test_json_logs_carry_ids_but_never_prompt_text(service, redis_url: str) -> None:
    svc = service(LOG_FORMAT="json", WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    secret = "zebra-violet-prompt"
    job = chat(client, f"tell me about {secret}", correlation_id="corr-logs")
    wait_all(client, [job])
    said = eventually(lambda: [line for line in svc.tail(400).splitlines() if job in line], what="the job's log line")
    lines = [msgspec.json.decode(line) for line in said]
    (done,) = [line for line in lines if line["message"] == "job completed"]
    assert done["jobId"] == job and done["correlationId"] == "corr-logs" and done["workerId"].count(":") == 1
    assert {"timestamp", "level", "logger", "pid"} <= set(done)
    assert secret not in svc.tail(1000)


def test_log_prompts_puts_the_text_in_the_log_when_an_operator_asks(service, redis_url: str) -> None:
    svc = service(LOG_FORMAT="json", LOG_PROMPTS="true", WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    job = chat(client, "tell me about zebra-violet-prompt")
    wait_all(client, [job])
    line = eventually(
        lambda: next((line for line in svc.tail(400).splitlines() if job in line and "job completed" in line), None),
        what="the completed line",
    )
    entry = msgspec.json.decode(line)
    assert "zebra-violet-prompt" in entry["prompt"] and entry["completion"]
    assert "LOG_PROMPTS is on" in svc.tail(400)
    assert b"zebra-violet-prompt" not in urllib3.request("GET", svc.url + "/metrics").data
