"""The ``kfac-edit`` command: a thin layer that parses arguments and calls the Python API.

Each subcommand NAME lives in ``kfac_edit/commands/NAME.py`` (``-`` written ``_``): its docstring is the command's
description, ``HELP`` its one-line summary, ``add_arguments(parser)`` adds its options and ``run(args) -> int`` runs
it (or ``register(subparsers)`` does it all). User mistakes raise :class:`UserError`: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError
from .progress import switch_off

COMMANDS = ("demo", "collect", "import-factors", "edit", "predict", "eval", "find-memorized", "run", "sweep", "report")


class _Parser(argparse.ArgumentParser):
    """argparse's parser (subcommands' too), but a usage mistake is one line like every other error, not the usage
    text: ``kfac-edit: error: MESSAGE; see PROG --help``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"kfac-edit: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kfac-edit", description="Remove rote memorization from a causal LM by editing its MLP "
                     "weights along K-FAC curvature.")
    parser.add_argument("--version", action="version", version=f"kfac-edit {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__}.commands.{name.replace('-', '_')}")
        if hasattr(module, "register"):
            module.register(sub)
        else:
            command = sub.add_parser(name, help=module.HELP, description=module.__doc__)
            module.add_arguments(command)
            command.set_defaults(func=module.run)
    for command in sub.choices.values():  # -v/-q also after the subcommand: `kfac-edit collect -v ...`
        _add_verbosity(command, argparse.SUPPRESS)
        command.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    """``-v``/``-q``; a subcommand's copies default to SUPPRESS: they set what follows it, never undo what precedes."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="log only warnings and errors (no progress lines)")


def _log_level(args: argparse.Namespace) -> int:
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose and quiet:
        raise UserError("-v and -q contradict each other; give one of them")
    return logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO


def main(argv: list[str] | None = None) -> int:
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logging.basicConfig(level=_log_level(args), format="%(message)s", stream=sys.stderr)
        for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        hub_logging.disable_propagation()  # it has its own stderr handler: each retry warning printed once, not twice
        hf_logging.disable_progress_bar()  # transformers' loading bars and advice: ours say what matters
        hf_logging.set_verbosity_error()
        switch_off(getattr(args, "no_progress", False))
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"kfac-edit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kfac-edit: interrupted", file=sys.stderr)
        return 130


def entry() -> None:  # pragma: no cover - the console script and `python -m`
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while the commands are still being imported, before main's own handler
        print("kfac-edit: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    entry()
