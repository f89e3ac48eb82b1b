"""CLI conventions: `python -m kfac_edit`, -v/-q before or after the subcommand."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from kfac_edit import __version__
from kfac_edit.cli import _log_level, build_parser, main


@pytest.mark.parametrize(
    "argv, level",
    [
        (["eval", "--model", "m"], logging.INFO),
        (["-v", "eval", "--model", "m"], logging.DEBUG),
        (["eval", "--model", "m", "-v"], logging.DEBUG),
        (["eval", "-q", "--model", "m"], logging.WARNING),
        (["--quiet", "collect", "--model", "m", "--data", "d", "--out", "o"], logging.WARNING),
    ],
)
def test_verbosity_before_or_after_the_subcommand(argv, level):
    assert _log_level(build_parser().parse_args(argv)) == level


def test_contradicting_verbosity_is_one_line(capsys):
    assert main(["-v", "eval", "-q", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err == "kfac-edit: error: -v and -q contradict each other; give one of them\n"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "kfac_edit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"kfac-edit {__version__}"


def test_hub_warnings_are_printed_once(tmp_path, capsys):
    """huggingface_hub logs through its own stderr handler; propagating to ours too printed every retry warning twice
    (12 lines for 6 retries while an unreachable hub id is tried)."""
    hub = logging.getLogger("huggingface_hub")
    try:
        assert main(["report", str(tmp_path / "none")]) == 2
        assert not hub.propagate
    finally:
        hub.propagate = True
