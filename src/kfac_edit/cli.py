"""The ``kfac-edit`` command: a thin layer that parses arguments and calls the Python API.

Each subcommand lives in ``kfac_edit/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a ``run(args) -> int`` function. User mistakes raise :class:`UserError`: printed as one
line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import __version__
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfac-edit",
        description="Remove rote memorization from a causal LM by editing its MLP weights along K-FAC curvature.",
    )
    parser.add_argument("--version", action="version", version=f"kfac-edit {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands

    modules = []
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        modules.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    for mod in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        mod.register(sub)
    for command_parser in sub.choices.values():  # -v/-q also after the subcommand: `kfac-edit collect -v ...`
        _add_verbosity(command_parser, argparse.SUPPRESS)
        if "--no-progress" not in command_parser._option_string_actions:  # the same option on every command
            command_parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    """``-v`` (debug messages) and ``-q`` (warnings and errors only). A subcommand's copies default to SUPPRESS, so
    they only set what is given after the subcommand and never undo what was given before it."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="log only warnings and errors (no progress lines)"
    )


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "verbose", False) and getattr(args, "quiet", False):
        raise UserError("-v and -q contradict each other; give one of them")
    if getattr(args, "verbose", False):
        return logging.DEBUG
    return logging.WARNING if getattr(args, "quiet", False) else logging.INFO


def _quiet_transformers() -> None:
    """Keep transformers' own weight-loading bars and advisory warnings off the console: ours say what matters."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = _log_level(args)
    except UserError as exc:
        print(f"kfac-edit: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_transformers()
    from .progress import switch_off

    switch_off(getattr(args, "no_progress", False))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"kfac-edit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kfac-edit: interrupted", file=sys.stderr)
        return 130


def entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
