"""An Ollama look-alike for tests, demos, benchmarks and chaos drills.

Serves Ollama's API shapes (``/``, ``/api/version``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/pull``, ``/api/delete``, ``/api/chat``, ``/api/generate``,
``/api/embed``, ``/api/embeddings``) and, as Ollama does beside them, OpenAI's
(``/v1/models``, ``/v1/chat/completions``, ``/v1/embeddings``; see openai.py)
with settable latency, capacity and faults::

    with Simulator(SimulatorConfig(latency_ms=50, slots=1)) as sim:
        requests.post(f"{sim.url}/api/chat", json={...})
        sim.set_faults([Fault(reason="oom", count=2)])
        sim.stats().max_in_slots

or from a shell: ``llm-worker simulate --port 0 --fault kind=cut,after_chunks=2``
prints ``llm-worker simulator listening on http://HOST:PORT`` and serves until
SIGTERM or SIGINT.

What a model says is deterministic: a reply echoes the first words of the
(last user) prompt and counts on ("Why is the sky blue? 6 7 ..."), so its
whitespace-separated words are exactly ``eval_count``; ``prompt_eval_count`` is
the prompt's word count; ``options.num_predict`` cuts a reply short
(done_reason "length"). Embeddings are unit vectors seeded from a hash of the
model and the text. Models load on first use (``load_ms``, per model
``model_load_ms``), reload when ``num_ctx``, ``num_gpu``, ``num_batch``,
``num_thread`` or ``use_mmap`` differ from the loaded instance's (a request that
leaves one out means Ollama's default), and unload on ``keep_alive`` 0 or
expiry. ``slots`` requests run at once, ``max_queue`` more wait in FIFO order,
the rest get Ollama's 503. Both APIs share all of this: a /v1 chat completion
says what /api/chat says (``max_tokens`` plays ``num_predict``), and /v1/embeddings
returns /api/embed's vectors. With ``api_key`` set (``--api-key``), /v1 requests
without ``Authorization: Bearer <api_key>`` get OpenAI's 401 ``invalid_api_key``.

Faults: a list of objects, each matched against every request (control routes
excepted) in order; the first that matches and fires wins::

    {"kind": "status",          # status | stream_error | cut | hang
     "status": 500,             # status: HTTP code; default from reason, else 500
     "reason": "oom",           # oom | runner | busy | bad_request | not_found | internal
                                #   | rate_limit (429): the message; default from status
                                #   (500: runner)
     "message": null,           # the error text itself, instead of the reason's
     "model": "llama3.2",       # only this model (x and x:latest alike); absent: any
     "endpoints": ["chat"],     # absent: the inference routes of both APIs, chat,
                                #   generate, embed, embeddings, openai_chat and
                                #   openai_embeddings; also pull, show, delete, tags,
                                #   ps, version, root and openai_models
     "count": 3,                # fire 3 times, then retire; absent: forever
     "probability": 1.0,        # chance that a matching request is hit
     "after_chunks": 0,         # stream_error, cut: lines sent first
     "seconds": null}           # hang: answer normally after this long; absent: never

- ``status`` answers at once with ``{"error": message}`` (on /v1, OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``).
- ``stream_error`` sends ``after_chunks`` lines of a 200 stream, then
  ``{"error": ...}`` (default "an error was encountered while running the
  model: unexpected EOF"; on /v1 an SSE event ``data: {"error": {...}}``) and
  ends the stream; a non-streaming request gets a 500 with that error after its
  work is done.
- ``cut`` sends ``after_chunks`` lines, then closes the connection with no final
  line (on /v1, no ``data: [DONE]``); a non-streaming request's connection
  closes with no answer.
- ``hang`` holds the request before it takes a slot (other requests go on);
  it is dropped when its client leaves or the simulator stops.
The final ``done`` line (on /v1, ``data: [DONE]``) never precedes a stream fault.

Control API: ``POST /_sim/faults`` ``{"faults": [...]}`` replaces the faults,
``GET`` lists them (with remaining counts), ``DELETE`` clears them;
``GET /_sim/stats`` returns SimStats as JSON; ``POST /_sim/reset`` clears the
stats and unloads every model (faults stay).
"""

from __future__ import annotations

from llm_worker.simulator.cli import main
from llm_worker.simulator.config import Fault, FaultList, SimulatorConfig, parse_fault
from llm_worker.simulator.server import Simulator
from llm_worker.simulator.stats import SimStats

__all__ = ["Fault", "FaultList", "SimStats", "Simulator", "SimulatorConfig", "main", "parse_fault"]
