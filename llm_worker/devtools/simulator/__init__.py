"""An Ollama look-alike for tests, demos, benchmarks and chaos drills; docs/simulator.md tells it all.

Serves Ollama's API shapes (``/``, ``/api/version``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/pull``, ``/api/delete``, ``/api/chat``, ``/api/generate``,
``/api/embed``, ``/api/embeddings``) and, as Ollama does beside them, OpenAI's
(``/v1/models``, ``/v1/chat/completions``, ``/v1/embeddings``; see openai.py);
and, on the same engine, Anthropic's Messages API (``/v1/messages``, and
``/v1/models`` for a client that sends ``anthropic-version`` or ``x-api-key``;
anthropic.py) and OpenRouter's (``/api/v1/chat/completions``,
``/api/v1/models``; openrouter.py); with settable latency, capacity and faults::

    with Simulator(SimulatorConfig(latency_ms=50, num_parallel=1)) as sim:
        requests.post(f"{sim.url}/api/chat", json={...})
        sim.set_faults([Fault(reason="oom", count=2)])
        sim.stats().max_in_slots

or from a shell: ``llm-worker simulate --port 0 --fault kind=cut,after_chunks=2``
prints ``llm-worker simulator listening on http://HOST:PORT`` and serves until
SIGTERM or SIGINT.

It behaves as Ollama v0.33 does, each rule cited in the module that keeps it:
the scheduler (scheduler.py: one load at a time, shared by every request that
waits for it and aborted when its client leaves; OLLAMA_MAX_QUEUE counting only
requests waiting for the scheduler; OLLAMA_MAX_LOADED_MODELS and the eviction
order), each loaded model's slots (stats.py: OLLAMA_NUM_PARALLEL per model, 1
for embedding models, waiters without limit), what each endpoint checks and
answers (inference.py: thinking, options' types, capabilities, answers that
end without their done line), the Host check (server.py), and the wording that
changed between versions (versions.py, ``ollama_version``).

What a model says is deterministic: a reply echoes the first words of the
(last user) prompt and counts on ("Why is the sky blue? 6 7 ..."), so its
whitespace-separated words are exactly ``eval_count`` (plus the reasoning of a
thinking model, "Thinking at medium effort."); ``prompt_eval_count`` is the
prompt's word count; ``options.num_predict`` cuts a reply short (done_reason
"length"). Embeddings are unit vectors seeded from a hash of the model and the
text. Both APIs share all of this: a /v1 chat completion says what /api/chat
says (``max_tokens`` plays ``num_predict``), and /v1/embeddings returns
/api/embed's vectors. With ``api_key`` set (``--api-key``), /v1 requests
without ``Authorization: Bearer <api_key>`` get OpenAI's 401 ``invalid_api_key``.

Faults: a list of objects, each matched against every request (control routes
excepted) in order; the first that matches and fires wins::

    {"kind": "status",          # status | stream_error | cut | hang | abort
     "status": 500,             # status: HTTP code; default from reason and endpoint, else 500
     "reason": "oom",           # oom | runner (the load failed) | crash | run_oom | internal
                                #   (the call failed) | busy | bad_request | not_found
                                #   | rate_limit (429) | overloaded (529, Anthropic's):
                                #   the message (each API's own words on its routes);
                                #   default from status (500: runner)
     "message": null,           # the error text itself, instead of the reason's
     "model": "llama3.2",       # only this model (x and x:latest alike); absent: any
     "endpoints": ["chat"],     # absent: the inference routes of every API, chat,
                                #   generate, embed, embeddings, openai_chat,
                                #   openai_embeddings, anthropic_messages and
                                #   openrouter_chat (abort: chat and generate);
                                #   also pull, show, delete, tags, ps, version, root,
                                #   openai_models, anthropic_models, openrouter_models
     "count": 3,                # fire 3 times, then retire; absent: forever
     "probability": 1.0,        # chance that a matching request is hit
     "after_chunks": 0,         # stream_error, cut, abort: pieces sent first
     "seconds": null,           # hang: answer normally after this long; absent: never
     "retry_after": null}       # status: a Retry-After header (seconds, or a text such
                                #   as an HTTP-date); absent: none

- ``status`` answers at once with ``{"error": message}`` (on /v1, OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``; on /v1/messages,
  Anthropic's; on /api/v1, OpenRouter's); the call's own failures
  (crash, run_oom, internal) are 400 on /api/embed, as Ollama answers them.
- ``stream_error`` sends ``after_chunks`` lines of a 200 stream, then
  ``{"error": ...}`` (default "an error was encountered while running the
  model: unexpected EOF"; on /v1 an SSE event ``data: {"error": {...}}``) and
  ends the stream; with no line before it, /api answers a 500 with that error
  instead, as Ollama does; a non-streaming request gets a 500 after its work.
- ``cut`` sends ``after_chunks`` lines, then closes the connection with no final
  line (on /v1, no ``data: [DONE]``); a non-streaming request's connection
  closes with no answer.
- ``hang`` holds the request before it reaches the scheduler (other requests go
  on); it is dropped when its client leaves or the simulator stops.
- ``abort`` ends a chat or generate answer after ``after_chunks`` pieces with no
  done line and no error: a stream just ends; a whole answer is 200 with
  ``"done": false``.
The final ``done`` line (on /v1, ``data: [DONE]``) never precedes a stream fault.

Control API: ``POST /_sim/faults`` ``{"faults": [...]}`` replaces the faults,
``GET`` lists them (with remaining counts), ``DELETE`` clears them;
``GET /_sim/stats`` returns SimStats as JSON; ``POST /_sim/reset`` clears the
stats and unloads every model (faults stay).
"""

from __future__ import annotations

from llm_worker.devtools.simulator.cli import main
from llm_worker.devtools.simulator.config import Fault, FaultList, SimulatorConfig, parse_fault
from llm_worker.devtools.simulator.server import Simulator
from llm_worker.devtools.simulator.stats import SimStats

__all__ = ["Fault", "FaultList", "SimStats", "Simulator", "SimulatorConfig", "main", "parse_fault"]
