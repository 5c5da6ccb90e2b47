"""Settings from the command line: a flag per setting, read over the environment and the TOML file.

Shared by every command that needs settings (main.py and models.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from llm_worker import exitcodes
from llm_worker.settings import config


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of settings ([section] key = value); overrides the environment"
    )
    group = parser.add_argument_group("settings (each overrides its environment variable and the TOML file)")
    for decl in config.declarations():
        group.add_argument(decl.flag, dest=f"setting_{decl.env}", metavar="VALUE", help=f"{decl.env}: {decl.doc}")


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
