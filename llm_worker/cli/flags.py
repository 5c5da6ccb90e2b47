"""Settings from the command line: a flag per setting, read over the environment and the TOML file.

Shared by every command that needs settings (main.py and models.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from llm_worker import exitcodes
from llm_worker.settings import config


def add_setting_flags(parser: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """A flag per setting, in a group of their own at the end of ``--help``.

    ``hidden``: ``--help`` leaves them out (and says so); ``--help-settings`` shows them.
    """
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of settings ([section] key = value); overrides the environment"
    )
    if hidden:
        parser.add_argument(
            "--help-settings", action=_ShowSettings, help="show this help with a flag per setting, and exit"
        )
        more = f"Every setting also has a flag (--redis-url VALUE, ...): see `{parser.prog} --help-settings`."
        parser.epilog = f"{parser.epilog}\n\n{more}" if parser.epilog else more
    group = parser.add_argument_group("settings (each overrides its environment variable and the TOML file)")
    for decl in config.declarations():
        action = group.add_argument(
            decl.flag,
            dest=f"setting_{decl.env}",
            metavar="VALUE",
            help=argparse.SUPPRESS if hidden else f"{decl.env}: {decl.doc}",
        )
        action.setting_help = f"{decl.env}: {decl.doc}"  # type: ignore[attr-defined]


class _ShowSettings(argparse.Action):
    """``--help-settings``: the help, with the setting flags that ``--help`` leaves out."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help=kwargs.get("help"))  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.usage = parser.format_usage().removeprefix("usage: ").rstrip() + " [SETTING FLAGS]"
        for action in parser._actions:
            if hasattr(action, "setting_help"):
                action.help = action.setting_help
        parser.epilog = None
        parser.print_help()
        parser.exit()


def setting_flags(args: argparse.Namespace) -> dict[str, str]:
    return {
        key[len("setting_") :]: value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }


def load_settings(args: argparse.Namespace) -> config.Loaded:
    return config.load(os.environ, args.config, setting_flags(args))


def explain(exc: config.SettingError) -> int:
    print(f"llm-worker: bad setting: {exc}", file=sys.stderr)
    return exitcodes.USAGE


def settings_or_exit(args: argparse.Namespace) -> config.Settings:
    try:
        args._settings = load_settings(args).settings
    except config.SettingError as exc:
        raise SystemExit(explain(exc)) from None
    return args._settings
