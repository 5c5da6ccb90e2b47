"""``llm-worker simulate``: serve the simulator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys

import msgspec

from llm_worker.devtools.simulator.config import DEFAULT_MODELS, SimulatorConfig, parse_fault
from llm_worker.devtools.simulator.server import Simulator

FAULT_HELP = """\
a fault to start with (repeatable): JSON, or key=value pairs joined by commas.
Keys: kind (status | stream_error | cut | hang | abort; default status), status
(HTTP code), reason (oom | runner | crash | run_oom | busy | bad_request |
not_found | internal | rate_limit | overloaded: which message), message, model,
endpoints (chat+generate+embed+embeddings+openai_chat+openai_embeddings+
anthropic_messages+openrouter_chat, the default, and pull+show+delete+tags+ps+
version+root+openai_models+anthropic_models+openrouter_models), count,
probability, after_chunks, seconds, retry_after (a Retry-After header). E.g.
`reason=oom,count=3,model=llama3.2`, `kind=cut,after_chunks=2`,
`kind=abort,after_chunks=5`, `reason=crash,endpoints=embed`,
`kind=hang,endpoints=tags`, `reason=rate_limit,retry_after=7,count=3`,
`reason=overloaded,endpoints=anthropic_messages`.
Change them at run time with POST /_sim/faults (see docs/simulator.md)."""


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _load_time(text: str) -> tuple[str, float]:
    name, sep, ms = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not MODEL=MS")
    return name, float(ms)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-worker simulate",
        description="Serve an Ollama look-alike, its /v1 API included, and Anthropic's and OpenRouter's APIs, "
        "with settable latency, capacity and faults.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    add("--port", type=int, default=11434, help="port to bind; 0 picks a free one (default %(default)s)")
    add("--models", type=_names, default=list(DEFAULT_MODELS), help="available models, comma-separated")
    add(
        "--registry",
        type=_names,
        default=None,
        help="models /api/pull finds, comma-separated (default: any name without 'missing')",
    )
    add("--latency-ms", type=float, default=0.0, help="chat/generate: time before the first byte")
    add("--token-ms", type=float, default=0.0, help="chat/generate: time per token")
    add("--embed-call-ms", type=float, default=0.0, help="embed: time per call")
    add("--embed-input-ms", type=float, default=0.0, help="embed: time per input")
    add("--load-ms", type=float, default=0.0, help="time to load a model that is not loaded")
    add(
        "--model-load-ms",
        type=_load_time,
        action="append",
        default=[],
        metavar="MODEL=MS",
        help="one model's load time (repeatable), e.g. a slow first load",
    )
    add("--pull-ms", type=float, default=0.0, help="time a pull takes")
    add(
        "--num-parallel",
        "--slots",
        dest="num_parallel",
        type=int,
        default=1,
        help="requests each loaded model serves at once; embedding models 1 (OLLAMA_NUM_PARALLEL; --slots: old name)",
    )
    add(
        "--max-queue",
        type=int,
        default=512,
        help="requests that may wait for the scheduler (a load) before 503 (OLLAMA_MAX_QUEUE)",
    )
    add(
        "--max-loaded",
        type=int,
        default=0,
        help="models loaded at once; 0: Ollama's 3 per GPU (OLLAMA_MAX_LOADED_MODELS)",
    )
    add("--gpus", type=int, default=1, help="GPUs of the simulated host, for --max-loaded 0 (0: CPU only)")
    add(
        "--ollama-version",
        default="0.33.0",
        help="the Ollama whose error wording and statuses to imitate where versions differ (default %(default)s)",
    )
    add("--dims", type=int, default=16, help="embedding dimension")
    add("--reply-tokens", type=int, default=12, help="tokens in a reply num_predict does not cut short")
    add("--num-ctx", type=int, default=4096, help="context length models load with by default")
    add("--keep-alive", default="5m", help="how long idle models stay loaded (Go duration)")
    add(
        "--not-found-style",
        choices=("old", "new"),
        default=None,
        help='force one text for a missing model on every endpoint: old: \'model "x" not found, try pulling it '
        "first'; new: \"model 'x' not found\" (default: each endpoint's, per --ollama-version)",
    )
    add("--fault", type=parse_fault, action="append", default=[], metavar="SPEC", help=FAULT_HELP)
    add("--seed", type=int, default=0, help="seed of probabilistic faults")
    add("--api-key", default="", help="make /v1 requests send `Authorization: Bearer KEY` (default: no check)")
    return parser


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        models=args.models,
        registry=args.registry,
        dims=args.dims,
        reply_tokens=args.reply_tokens,
        num_ctx=args.num_ctx,
        keep_alive=args.keep_alive,
        latency_ms=args.latency_ms,
        token_ms=args.token_ms,
        embed_call_ms=args.embed_call_ms,
        embed_input_ms=args.embed_input_ms,
        load_ms=args.load_ms,
        model_load_ms=dict(args.model_load_ms),
        pull_ms=args.pull_ms,
        num_parallel=args.num_parallel,
        max_queue=args.max_queue,
        max_loaded=args.max_loaded,
        gpus=args.gpus,
        ollama_version=args.ollama_version,
        not_found_style=args.not_found_style,
        faults=args.fault,
        seed=args.seed,
        api_key=args.api_key,
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``llm-worker simulate ARGS``; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, msgspec.ValidationError) as exc:
        parser.error(str(exc))
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Block the signals before any thread starts, so every thread inherits the mask and
    # the main thread takes them synchronously with sigwait: no handler, no races.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        try:
            simulator = Simulator(config).start()
        except OSError as exc:
            print(f"llm-worker simulate: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
            return 1
        try:
            print(f"llm-worker simulator listening on {simulator.url}", flush=True)
            signal.sigwait(stop_signals)
        finally:
            simulator.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 0
