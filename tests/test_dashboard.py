"""The /dashboard page: served safely, its data without prompt text, its actions behind the token, and
what a real headless Chromium shows of a real service with work in it."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import fake_pynvml
import msgspec
import redis
import urllib3
from chromium import Browser, chromium_binary
from support import chat, client_for, eventually, wait_all

from llm_worker.devtools.simulator import Fault, Simulator

ROOT = Path(__file__).parent.parent
OUTPUT = Path(__file__).parent / "output"  # screenshots, kept after the run (gitignored)
TOKEN = "dash-token-3e9a"
PROMPT = "the okapi-7c41 sanctuary at dawn"
FAST = {"HOST_SAMPLE_INTERVAL": "200", "OLLAMA_HEALTH_CHECK_INTERVAL": "500"}


def request(svc, method: str, path: str, token: str | None = None, **headers: str) -> urllib3.BaseHTTPResponse:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return urllib3.request(method, svc.url + path, headers=headers, retries=False, timeout=10)


def push_bad_payloads(r: redis.Redis) -> list[str]:
    """Jobs that go straight to the dead-letter list, each with the prompt in a different place; their reasons."""
    message = {"role": "wizard", "content": PROMPT}  # no such role: refused, not retried
    jobs = [
        {"id": "dl-chat", "type": "chat", "userId": "u1", "model": "llama3.2", "request": {"messages": [message]}},
        {
            "id": "dl-generate",
            "type": "generate",
            "userId": "u1",
            "model": "llama3.2",
            "request": {"prompt": PROMPT, "system": PROMPT, "options": {"num_ctx": -1}},
        },
        {
            "id": "dl-embed",
            "type": "embeddings",
            "userId": "u1",
            "model": "nomic-embed-text",
            "request": {"input": [PROMPT, PROMPT], "truncate": "no"},
        },
    ]
    for job in jobs:
        r.lpush("llm-chat", msgspec.json.encode(job))
    r.lpush("llm-chat", b'{"id": "dl-raw", "type": "chat", "request": {"messages": [{"content": "' + PROMPT.encode())
    eventually(lambda: r.llen("llm-dead-letter") == 4, timeout=20, what="four dead letters")
    return [msgspec.json.decode(raw)["error"] for raw in r.lrange("llm-dead-letter", 0, -1)]


class _Markup(HTMLParser):
    """What the page's HTML holds that a strict CSP would refuse: inline scripts, styles and handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.inline += [f"{tag} {name}" for name in names if name == "style" or name.startswith("on")]
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            self._in_script = True
            self.scripts.append(names.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline <script>")


def test_the_page_and_its_files_are_served_with_their_types_a_strict_csp_and_revalidation(service) -> None:
    svc = service(WORKER_POOLS="llm-chat=1")  # no ADMIN_TOKEN
    types = {
        "/dashboard": "text/html",
        "/dashboard/dashboard.css": "text/css",
        "/dashboard/dashboard.js": "text/javascript",
    }
    for path, wanted in types.items():
        got = request(svc, "GET", path)
        assert got.status == 200, path
        assert got.headers["Content-Type"].split(";")[0] == wanted, path
        csp = got.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe" not in csp
        assert got.headers["X-Content-Type-Options"] == "nosniff"
        assert got.headers["Cache-Control"] == "no-cache"  # revalidated each time: an upgrade shows at once
        again = request(svc, "GET", path, **{"If-None-Match": got.headers["ETag"]})
        assert again.status == 304 and again.data == b"", path
    page = request(svc, "GET", "/dashboard").data.decode()
    markup = _Markup()
    markup.feed(page)
    # Relative to the page, so that it works under a proxy's prefix too; /dashboard/ would break that: redirected.
    assert markup.inline == [] and markup.scripts == ["dashboard/dashboard.js"]
    moved = request(svc, "GET", "/dashboard/")
    assert moved.status == 301 and moved.headers["Location"] == "../dashboard"
    script = request(svc, "GET", "/dashboard/dashboard.js").data.decode()
    assert not re.search(r"""["'`]/(status|admin|dashboard)""", script), "a path from the root breaks under a prefix"
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"the page's script uses {sink}: build the DOM from text nodes"
    assert request(svc, "POST", "/dashboard").status == 405
    assert request(svc, "GET", "/dashboard/nope.js").status == 404
    data = request(svc, "GET", "/dashboard/data")
    assert data.status == 200 and data.headers["Cache-Control"] == "no-store"
    assert data.json()["admin"] == {"enabled": False}
    # Without ADMIN_TOKEN the actions the page would call do not exist.
    for path in ("/admin/queue/requeue?all=1", "/admin/queue/purge?queue=llm-chat", "/admin/models/unload?model=x"):
        assert request(svc, "POST", path, token="anything").status == 404, path


def test_the_data_route_hides_prompt_text_unless_log_prompts_is_on_and_the_token_given(service, r: redis.Redis) -> None:
    svc = service(ADMIN_TOKEN=TOKEN, WORKER_POOLS="llm-chat=1")
    reasons = push_bad_payloads(r)
    for token in (None, "wrong", TOKEN):  # LOG_PROMPTS is off: hidden even from the token's holder
        body = request(svc, "GET", "/dashboard/data", token=token)
        assert body.status == 200
        assert b"okapi-7c41" not in body.data, token
        data = body.json()
        assert data["promptsShown"] is False and data["admin"] == {"enabled": True}
    dead = data["deadLetters"]
    assert dead["total"] == 4 and dead["queue"] == "llm-dead-letter"
    rows = dead["newest"]
    assert [row["error"] for row in rows] == reasons  # newest first, as LPUSHed
    assert [row["jobId"] for row in rows] == [None, "dl-embed", "dl-generate", "dl-chat"]
    assert all(row["queue"] == "llm-chat" and row["errorType"] and row["failedAt"] for row in rows)
    chat_row = rows[3]
    hidden = f"[hidden: {len(PROMPT)} chars]"
    assert chat_row["type"] == "chat" and chat_row["model"] == "llama3.2"
    assert json.loads(chat_row["preview"])["request"]["messages"] == [{"role": "wizard", "content": hidden}]
    generate = json.loads(rows[2]["preview"])["request"]
    assert generate["prompt"] == generate["system"] == hidden and generate["options"] == {"num_ctx": -1}
    assert json.loads(rows[1]["preview"])["request"]["input"] == [hidden, hidden]
    assert rows[0]["preview"].startswith("not a job: [hidden: ")
    events = data["events"]
    assert events and [e["id"] for e in events] == sorted((e["id"] for e in events), key=_stream_order, reverse=True)
    assert "llm.request.dead_lettered" in {e["type"] for e in events}
    assert data["queues"]["llm-chat"]["failed"] == 3 and data["hosts"][svc.env["WORKER_ID"]][0]["alive"]

    shown = service(ADMIN_TOKEN=TOKEN, WORKER_POOLS="llm-chat=1", LOG_PROMPTS="true")  # the same Redis
    for token in (None, "wrong"):
        assert b"okapi-7c41" not in request(shown, "GET", "/dashboard/data", token=token).data, token
    data = request(shown, "GET", "/dashboard/data", token=TOKEN).json()
    assert data["promptsShown"] is True
    rows = data["deadLetters"]["newest"]
    assert json.loads(rows[3]["preview"])["request"]["messages"][0]["content"] == PROMPT
    assert PROMPT in rows[0]["preview"]  # the payload that was not JSON, as it came


def _stream_order(entry_id: str) -> tuple[int, int]:
    millis, seq = entry_id.split("-")
    return int(millis), int(seq)


def test_actions_are_refused_without_the_token_and_act_with_it(service, sim: Simulator, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    svc = service(ADMIN_TOKEN=TOKEN, WORKER_POOLS="llm-chat=1", QUEUE_MAX_ATTEMPTS="1", OLLAMA_MAX_RETRIES="0", **FAST)
    client = client_for(redis_url)
    sim.set_faults([Fault(status=500, count=1)])
    failed = chat(client, PROMPT)
    assert wait_all(client, [failed])[failed]["success"] is False
    actions = [
        f"/admin/queue/requeue?id={failed}",
        "/admin/queue/requeue?all=1",
        "/admin/queue/purge?queue=llm-chat",
        "/admin/models/unload?model=llama3.2",
        "/admin/breakers/force-open?key=ollama:llama3.2",
    ]
    for path in actions:
        for token in (None, "wrong", TOKEN + "x"):
            answer = request(svc, "POST", path, token=token)
            assert answer.status == 401, (path, token)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert request(svc, "GET", path, token=TOKEN).status == 405, path  # a change is never a GET
    assert r.llen("llm-dead-letter") == 1  # nothing was done
    assert all(b["state"] == "closed" for b in svc.get("/status")[1]["breakers"])

    # With the token: the dead letter goes back to its queue and this time is answered.
    requeued = request(svc, "POST", f"/admin/queue/requeue?id={failed}", token=TOKEN)
    assert requeued.status == 200 and requeued.json() == {"requeued": 1, "notRequeued": []}
    assert wait_all(client, [failed])[failed]["success"] is True
    assert r.llen("llm-dead-letter") == 0
    assert request(svc, "POST", "/admin/queue/requeue?id=no-such-job", token=TOKEN).status == 404
    assert request(svc, "POST", "/admin/queue/requeue", token=TOKEN).status == 400

    # Purge: this host's queues only, never another list that happens to be in Redis.
    r.rpush("llm-batch", b"{}", b"{}")
    purged = request(svc, "POST", "/admin/queue/purge?queue=llm-batch", token=TOKEN)
    assert purged.status == 200 and purged.json() == {"queue": "llm-batch", "purged": 2}
    r.rpush("llm:processing:someone", b"{}")
    assert request(svc, "POST", "/admin/queue/purge?queue=llm:processing:someone", token=TOKEN).status == 404
    assert r.llen("llm:processing:someone") == 1

    # Unload: done by Ollama when no worker is calling the model; refused while one is.
    assert any(m["name"].startswith("llama3.2") for m in _ps(sim))
    assert request(svc, "POST", "/admin/models/unload?model=llama3.2&endpoint=nope", token=TOKEN).status == 404
    unloaded = request(svc, "POST", "/admin/models/unload?model=llama3.2", token=TOKEN)
    assert unloaded.status == 200, unloaded.data
    eventually(lambda: not _ps(sim), what="llama3.2 unloaded")
    sim.set_faults([Fault(kind="hang", model="llama3.2", count=1, seconds=30)])
    held = chat(client, "hold on")
    eventually(lambda: any(w["jobId"] == held for w in svc.get("/status")[1]["workers"]), what="the job in hand")
    busy = request(svc, "POST", "/admin/models/unload?model=llama3.2", token=TOKEN)
    assert busy.status == 409 and "in use" in busy.json()["error"]
    sim.stop()  # lets the held call go, so that the service stops at once


def _ps(sim: Simulator) -> list[dict]:
    return urllib3.request("GET", sim.url + "/api/ps").json()["models"]


def _rows(browser: Browser, section: str, nth: int = 0) -> list[list[str]]:
    """The cells' text of a section's ``nth`` table, row by row, as rendered."""
    return browser.evaluate(
        f"[...document.querySelectorAll('#{section} table')[{nth}].tBodies[0].rows]"
        ".map((tr) => [...tr.cells].map((td) => td.innerText.trim()))"
    )


def test_a_real_browser_shows_workers_queues_dead_letters_and_breakers(
    service, sim: Simulator, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    chromium_binary()  # skip (fail in CI) before starting anything
    svc = service(
        ADMIN_TOKEN=TOKEN,
        WORKER_POOLS="llm-chat=1,llm-embeddings=1",
        LLM_WORKER_NVML_MODULE="fake_pynvml",
        FAKE_NVML_SCENARIO=json.dumps({"gpus": [fake_pynvml.gpu(0, utilization=72, temperature=64)]}),
        WORKER_GRACEFUL_TIMEOUT="1000",
        MODEL_MANAGER_INTERVAL="200",
        **FAST,
    )
    client = client_for(redis_url)
    reasons = push_bad_payloads(r)
    wait_all(
        client, [chat(client, "warm up"), client.submit("embeddings", {"input": "warm"}, model="nomic-embed-text")]
    )
    eventually(lambda: len(svc.get("/status")[1]["models"]["loaded"]) == 2, what="two models loaded")
    opened = request(svc, "POST", "/admin/breakers/force-open?key=ollama:mistral", token=TOKEN)
    assert opened.status == 200 and opened.json()["state"] == "open"
    # A worker busy on a call that does not return, and jobs waiting behind it.
    sim.set_faults([Fault(kind="hang", model="llama3.2", count=1, seconds=60)])
    slow = chat(client, PROMPT)
    eventually(lambda: any(w["jobId"] == slow for w in svc.get("/status")[1]["workers"]), what="the slow job in hand")
    for _ in range(3):
        chat(client, PROMPT)
    eventually(lambda: svc.get("/status")[1]["queues"]["llm-chat"]["waiting"] == 3, what="three jobs waiting")
    pids = {str(w["pid"]) for w in svc.get("/status")[1]["workers"]}

    with Browser(tmp_path) as browser:
        browser.size(1280, 1600)
        browser.open(svc.url + "/dashboard")
        browser.wait_for(
            "document.body.dataset.rendered && document.querySelectorAll('#dead li.dead').length === 4"
            " && document.querySelector('#summary .badge') !== null",
            what="the first full render",
        )
        html = browser.evaluate("document.documentElement.outerHTML")
        assert "okapi-7c41" not in html  # neither the dead letters' prompts nor the queued jobs'
        workers = {row[0]: row for row in _rows(browser, "workers")}
        assert set(workers) == pids
        busy = [row for row in workers.values() if row[2] == "busy"]
        assert len(busy) == 1 and busy[0][1] == "llm-chat" and busy[0][3] == slow
        queues = {row[0]: row for row in _rows(browser, "queues")}
        assert queues["llm-chat"][1] == "3" and queues["llm-chat"][2] == "1"  # waiting, processing
        dead = browser.evaluate("document.querySelector('#dead').innerText")
        assert all(reason in dead for reason in reasons) and "[hidden: " in dead
        breakers = {row[0]: row for row in _rows(browser, "breakers")}
        assert breakers["ollama:mistral"][1].startswith("open")
        # The host's one Ollama in the table of endpoints, then the models loaded there.
        assert [row[0] for row in _rows(browser, "models")] == ["ollama"]
        models = {row[0]: row for row in _rows(browser, "models", 1)}
        assert set(models) == {"llama3.2:latest", "nomic-embed-text:latest"}
        assert models["llama3.2:latest"][2].endswith(" ago")  # last used
        gpus = browser.evaluate("document.querySelector('#gpus').innerText")
        assert "NVIDIA Fake A100 80GB" in gpus and "72%" in gpus
        events = browser.evaluate("document.querySelector('#events').innerText")
        assert "llm.request.dead_lettered" in events
        assert "Enter the admin token" in browser.evaluate("document.getElementById('token-state').innerText")
        assert browser.evaluate("document.querySelector('#breakers button.act').disabled") is True

        # A wrong token is said to be wrong and not kept; the right one is kept for the tab, and the actions
        # come alive.
        browser.evaluate(
            "document.getElementById('token').value = 'wrong';document.getElementById('token-form').requestSubmit()"
        )
        browser.wait_for("document.getElementById('token-state').innerText.includes('refused')", what="a refusal")
        assert browser.evaluate("sessionStorage.getItem('llm-worker-admin-token')") is None
        browser.evaluate(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.getElementById('token-form').requestSubmit()"
        )
        browser.wait_for("document.getElementById('token-state').innerText.includes('accepted')", what="the token")
        assert browser.evaluate("sessionStorage.getItem('llm-worker-admin-token')") == TOKEN
        assert TOKEN not in browser.evaluate("location.href")
        browser.wait_for("!document.querySelector('#breakers button.act').disabled", what="actions enabled")
        assert "okapi-7c41" not in browser.evaluate("document.documentElement.outerHTML")  # LOG_PROMPTS is off
        # Rates need two reads of the counters, a refresh apart.
        browser.wait_for(
            "document.querySelector('#queues tbody td:nth-child(5)').innerText.endsWith('/s')", what="rates"
        )
        browser.screenshot(OUTPUT / "dashboard.png", whole_page=True)
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(OUTPUT / "dashboard.png", ROOT / "docs" / "dashboard.png")

        # Closing the breaker from the page: the page calls the admin route, and says what it answered.
        browser.evaluate(
            "[...document.querySelectorAll('#breakers tr')].find((tr) => tr.innerText.includes('ollama:mistral'))"
            ".querySelector('button[title*=force-close]').click()"
        )
        browser.wait_for("document.getElementById('notice').innerText.includes('200')", what="the answer shown")
        breaker = next(b for b in svc.get("/status")[1]["breakers"] if b["key"] == "ollama:mistral")
        assert breaker["state"] == "closed" and breaker["forced"] == "closed"

        # Markup in the data stays text: a model name that is an HTML tag shows as written, and makes no element.
        tag = "<img src=x onerror=window.__xss=1>"
        job = {"id": "dl-xss", "type": "chat", "userId": "u1", "model": tag, "request": {"messages": []}}
        r.lpush("llm-embeddings", msgspec.json.encode(job))  # the chat worker is busy
        browser.wait_for("document.querySelectorAll('#dead li.dead').length === 5", what="the fifth dead letter")
        assert tag in browser.evaluate("document.querySelector('#dead').innerText")
        assert browser.evaluate("document.querySelectorAll('main img').length === 0 && window.__xss === undefined")

        # A hidden tab stops reading (no timer left), says so, and reads at once when shown again.
        shown = browser.evaluate("document.body.dataset.rendered")
        browser.evaluate(
            "Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        browser.wait_for("state.timer === null && !state.running", what="polling stopped while hidden")
        assert browser.evaluate("document.getElementById('updated').innerText") == "paused while this tab is hidden"
        # Meanwhile, /status as it reads with several inference endpoints per host: models grouped by endpoint.
        groups = browser.evaluate(
            "(async () => { const s = await (await fetch('/status')).json();"
            "  s.endpoints = ['gpu0', 'gpu1'].map((name, i) => ({endpoint: name, provider: 'ollama',"
            "    url: 'http://10.0.0.' + i + ':11434', up: true, callsInFlight: i, modelsLoaded: []}));"
            "  s.models.loaded = s.models.loaded.map((m, i) => ({...m, endpoint: 'gpu' + i}));"
            "  renderModels(s, null);"
            "  return [...document.querySelectorAll('#models h3')].map((h) => h.innerText); })()"
        )
        assert sorted(groups) == ["gpu0", "gpu1"]
        assert "http://10.0.0.1:11434" in browser.evaluate("document.querySelector('#models').innerText")
        browser.evaluate(
            "Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        browser.wait_for(f"document.body.dataset.rendered !== {json.dumps(shown)}", what="a read once visible")

        # A phone: nothing wider than the screen, so no sideways scrolling.
        browser.size(375, 1400, mobile=True)
        browser.evaluate("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
        width = browser.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page is {width}px wide on a 375px screen"
        browser.size(390, 1400, mobile=True)
        browser.screenshot(OUTPUT / "dashboard-phone.png")
        assert browser.evaluate("window.__refused") == [], "the CSP refused something the page needs"
        assert browser.evaluate("window.__errors") == []
    sim.stop()  # lets the held call go, so that the service stops at once
