"""Command line: ``llm-worker run | check-config | submit | queues | plugins | models | simulate``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis

from llm_worker import __version__, exitcodes
from llm_worker.cli import flags
from llm_worker.queue.keys import Keys
from llm_worker.settings import config, urls

log = logging.getLogger("llm_worker.cli")
Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":  # the simulator owns its flags
        from llm_worker.devtools import simulator

        return simulator.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return exitcodes.USAGE
    try:
        return args.command(args)
    except KeyboardInterrupt:
        return 130
    except redis.ConnectionError as exc:  # submit, queues: say so in a line, not a traceback
        settings = getattr(args, "_settings", None)
        where = urls.redis_location(settings.redis) if settings else "Redis"
        print(f"llm-worker: cannot reach {where}: {exc}", file=sys.stderr)
        return 1


# ---- commands ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from llm_worker import logs, supervisor
    from llm_worker.host.ratelimit import unknown_budgets
    from llm_worker.plugin.manager import PluginManager, discover

    try:
        settings = flags.load_settings(args).settings
    except config.SettingError as exc:
        return flags.explain(exc)
    logs.setup(settings.log, role="supervisor", workerId=settings.worker.id)
    for line in config.unused_settings(os.environ):  # once, at start: not on every reload or submit
        log.warning(line)
    try:
        # Import and check every plugin before anything forks: a broken or
        # misspelled plugin stops start-up here, with its name.
        plugins = discover()
        manager = PluginManager().load(plugins)
    except Exception as exc:
        print(f"llm-worker: a plugin failed to load: {exc!r}", file=sys.stderr)
        return exitcodes.USAGE
    try:
        manager.check_settings()  # plugins' own settings, as strictly as ours, before any process reads them
        providers = manager.providers(settings)
        names = [p.name for p in providers]
        for provider in providers:
            provider.close()
        unknown = unknown_budgets(settings, names)
        if unknown is not None:
            raise unknown
    except config.SettingError as exc:
        return flags.explain(exc)
    except Exception as exc:  # a plugin whose llm_worker_settings hook itself is broken
        print(f"llm-worker: a plugin failed to load: {exc!r}", file=sys.stderr)
        return exitcodes.USAGE
    refusal = _redis_refusal(settings)
    if refusal:
        print(f"llm-worker: {refusal}", file=sys.stderr)
        return exitcodes.USAGE
    return supervisor.run(settings, lambda: flags.load_settings(args).settings, plugins)


def _redis_refusal(settings: config.Settings) -> str | None:
    """Why this Redis cannot serve (a Cluster), if it answers now; workers ask again as they boot."""
    from llm_worker.queue.connection import ClusterRefused, connect, refuse_cluster

    client = connect(settings, timeout=2.0)
    try:
        refuse_cluster(client)
    except ClusterRefused as exc:
        return str(exc)
    except redis.RedisError:
        return None
    finally:
        client.close()
    return None


def cmd_check_config(args: argparse.Namespace) -> int:
    from llm_worker.plugin.manager import PluginManager

    if args.table:
        print(config.markdown_table())
        return exitcodes.OK
    try:
        loaded = flags.load_settings(args)
    except config.SettingError as exc:
        return flags.explain(exc)
    try:
        plugin_settings = PluginManager().load().check_settings()
    except config.SettingError as exc:
        return flags.explain(exc)
    except Exception as exc:
        print(f"llm-worker: a plugin failed to load: {exc!r}", file=sys.stderr)
        return exitcodes.USAGE
    for line in config.unused_settings(os.environ):
        print(line, file=sys.stderr)
    width = max(len(d.env) for d in config.declarations())
    for decl, value in config.effective(loaded.settings):
        source = loaded.sources.get(decl.env, "default")
        print(f"{decl.env:<{width}}  {value:<32}  ({source})")
    print(f"{'(redis url)':<{width}}  {urls.mask_url(loaded.settings.redis_url):<32}  (derived)")
    print(f"{'(pools)':<{width}}  {','.join(f'{k}={v}' for k, v in loaded.settings.pools.items()):<32}  (derived)")
    for plugin, section in plugin_settings:  # read from the environment only, by the plugin that declares them
        for decl, value in config.effective_section(section):
            source = decl.env if decl.env in os.environ else "default"
            print(f"{decl.env:<{width}}  {value:<32}  ({source}; plugin {plugin})")
    print("settings are valid", file=sys.stderr)
    return exitcodes.OK


def cmd_submit(args: argparse.Namespace) -> int:
    from llm_worker.queue.client import Client, JobFailed

    settings = flags.settings_or_exit(args)
    request = _request_of(args)
    client = Client.from_settings(settings)
    job_id = client.submit(
        args.type,
        request,
        model=args.model,
        queue=args.queue,
        timeout_ms=args.timeout_ms,
        urgent=args.urgent,
        correlation_id=args.correlation_id,
    )
    if args.no_wait:
        print(job_id)
        return exitcodes.OK
    if args.stream:
        try:
            for piece in client.stream(job_id, timeout=args.wait):
                sys.stdout.write("\n[restarted]\n" if piece == "\f" else piece)
                sys.stdout.flush()
        except JobFailed as exc:
            print(f"\nfailed: {exc}", file=sys.stderr)
            return 1
        print()
        return exitcodes.OK
    result = client.wait(job_id, timeout=args.wait)
    if result is None:
        print(f"no result for job {job_id} within {args.wait}s (it is still queued or running)", file=sys.stderr)
        return 1
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(result), indent=2).decode() + "\n")
    return exitcodes.OK if result.get("success") else 1


def _request_of(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in args.option or ():
        key, _, value = item.partition("=")
        try:  # numbers, true/false, lists: as JSON; anything else is text
            options[key] = msgspec.json.decode(value)
        except msgspec.DecodeError:
            options[key] = value
    if args.type == "embeddings":
        request: dict[str, Any] = {"input": args.input or [args.prompt or ""]}
    elif args.type == "generate":
        request = {"prompt": args.prompt or "", "stream": args.stream}
        if args.system:
            request["system"] = args.system
    elif args.type == "chat":
        messages = msgspec.json.decode(args.messages) if args.messages else []
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        if args.prompt:
            messages.append({"role": "user", "content": args.prompt})
        request = {"messages": messages, "stream": args.stream}
    else:
        request = msgspec.json.decode(args.messages or "{}")
    if options:
        request["options"] = options
    return request


def cmd_queues(args: argparse.Namespace) -> int:
    from llm_worker.queue.admin import QueueAdmin
    from llm_worker.queue.connection import connect

    settings = flags.settings_or_exit(args)
    admin = QueueAdmin(connect(settings), settings)
    action = args.action or "depths"
    if action == "depths":
        d = admin.depths()
        for name, count in d.waiting.items():
            print(f"{name:<28} {count:>8} waiting")
            for model, parked in sorted(d.parked.get(name, {}).items()):
                print(f"{'  parked for ' + model:<28} {parked:>8} waiting for a host holding it")
        print(
            f"{Keys(settings.redis.key_prefix, settings.queue.dead_letter).delayed:<28} {d.delayed:>8} waiting to retry"
        )
        print(f"{settings.queue.dead_letter:<28} {d.dead_letter:>8} dead letters")
        for worker, count in sorted(d.processing.items()):
            print(f"{'processing ' + worker:<28} {count:>8} in hand")
        return exitcodes.OK
    if action == "dead":
        for entry in admin.dead_letters(args.limit):
            job = entry.get("job") or {}
            print(
                f"{entry.get('failedAt', '?')}  {job.get('id', '(not a job)'):<40} "
                f"{entry.get('errorType', '?'):<10} {entry.get('error', '')}"
            )
        return exitcodes.OK
    if action == "requeue":
        if not args.all and not args.job_id:
            print("llm-worker: say which: a JOB_ID, or --all", file=sys.stderr)
            return exitcodes.USAGE
        moved, skipped = admin.requeue(None if args.all else args.job_id)
        print(f"requeued {moved} job(s)")
        for why in skipped:
            print(f"not requeued: {why}", file=sys.stderr)
        if not moved and not args.all:
            print(
                f"llm-worker: no dead letter of job {args.job_id!r} in {settings.queue.dead_letter} "
                "(see `llm-worker queues dead`)",
                file=sys.stderr,
            )
        return exitcodes.OK if moved or args.all else 1
    if action == "purge":
        if not args.job_id:
            print("llm-worker: say which queue to purge", file=sys.stderr)
            return exitcodes.USAGE
        name = args.job_id
        if not args.yes:
            try:
                answer = input(f"Delete every job in {name!r}? Type its name to confirm: ")
            except EOFError:  # no one to ask (a script): do nothing
                answer = ""
            if answer.strip() != name:
                print("not purged")
                return 1
        purged = admin.purge(name)
        if purged is None:
            known = ", ".join([*admin.queues(), settings.queue.dead_letter])
            print(f"llm-worker: no queue named {name!r} (the queues: {known})", file=sys.stderr)
            return 1
        print(f"purged {purged} job(s) from {name}")
        return exitcodes.OK
    return exitcodes.USAGE


def cmd_plugins(args: argparse.Namespace) -> int:
    from llm_worker.plugin.manager import PluginManager

    try:
        manager = PluginManager().load()
    except Exception as exc:
        print(f"llm-worker: a plugin failed to load: {exc!r}", file=sys.stderr)
        return exitcodes.USAGE
    for info in manager.plugins():
        print(f"{info.name:<20} {info.source:<32} {', '.join(info.hooks)}")
    for name in sorted(manager.disabled):
        print(f"{name:<20} {'(disabled by LLM_WORKER_DISABLE_PLUGINS)':<32}")
    return exitcodes.OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-worker", description="Run LLM jobs from Redis queues next to Ollama.")
    parser.add_argument("--version", action="version", version=f"llm-worker {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the supervisor, its workers and the HTTP process")
    flags.add_setting_flags(run)
    run.set_defaults(command=cmd_run)

    check = sub.add_parser("check-config", help="print the effective settings (secrets masked), or say what is wrong")
    flags.add_setting_flags(check)
    check.add_argument("--table", action="store_true", help="print the settings table of the README instead")
    check.set_defaults(command=cmd_check_config)

    submit = sub.add_parser(
        "submit",
        help="queue a job and print its result",
        description="Queue a job, wait for it and print its result (or stream its text). Exits 1 if the job failed.",
    )
    submit.add_argument(
        "--type",
        choices=["chat", "generate", "embeddings", "batch"],
        default="chat",
        help="the job's type (default: chat); it picks the queue and the default model",
    )
    submit.add_argument(
        "--model", help="the model (default: DEFAULT_CHAT_MODEL, or DEFAULT_EMBEDDING_MODEL for embeddings)"
    )
    submit.add_argument("--prompt", help="the user's message (chat), the prompt (generate) or the text (embeddings)")
    submit.add_argument("--system", help="a system message or prompt")
    submit.add_argument("--messages", help="chat messages as JSON (a batch job's whole request, for --type batch)")
    submit.add_argument("--input", action="append", help="an embeddings input (repeat for several)")
    submit.add_argument("--option", action="append", metavar="NAME=VALUE", help="an Ollama option (repeatable)")
    submit.add_argument("--stream", action="store_true", help="print the text as it is generated")
    submit.add_argument("--queue", help="queue to push to (default: by type)")
    submit.add_argument("--urgent", action="store_true", help="push to the serving end of the queue")
    submit.add_argument("--timeout-ms", type=int, help="the job's timeout")
    submit.add_argument(
        "--correlation-id", metavar="ID", help="an id of your own, copied into the result, the logs and the events"
    )
    submit.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the result")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and exit")
    flags.add_setting_flags(submit, hidden=True)
    submit.set_defaults(command=cmd_submit)

    queues = sub.add_parser(
        "queues",
        help="queue depths; list, requeue or purge dead letters and queues",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Look at the queues in Redis and mend them by hand.\n\n"
            "actions:\n"
            "  depths   jobs waiting in each queue, waiting to retry, dead-lettered and in workers' hands"
            " (the default)\n"
            "  dead     the newest dead letters (--limit): when, job id, error type and error\n"
            "  requeue  put a dead job (JOB_ID), or every one (--all), back at the end of its queue\n"
            "  purge    delete a queue (QUEUE) and every job in it; asks first unless --yes"
        ),
    )
    queues.add_argument(
        "action", nargs="?", choices=["depths", "dead", "requeue", "purge"], help="what to do (default: depths)"
    )
    queues.add_argument("job_id", nargs="?", metavar="JOB_ID|QUEUE", help="requeue: a dead job's id; purge: the queue")
    queues.add_argument("--all", action="store_true", help="requeue every dead letter")
    queues.add_argument("--limit", type=int, default=20, help="dead letters to list")
    queues.add_argument("--yes", action="store_true", help="purge without asking")
    flags.add_setting_flags(queues, hidden=True)
    queues.set_defaults(command=cmd_queues)

    plugins = sub.add_parser("plugins", help="list plugins, where they come from and their hooks")
    plugins.set_defaults(command=cmd_plugins)

    from llm_worker.cli import models as models_cli

    models_cli.add_parser(sub)

    sub.add_parser("simulate", help="run the Ollama simulator (see `llm-worker simulate --help`)", add_help=False)
    return parser


if __name__ == "__main__":
    sys.exit(main())
