"""The progress helper: a bar on a terminal, a log line every LOG_INTERVAL_S seconds elsewhere, nothing if disabled."""

from __future__ import annotations

import logging

import kfac_edit.progress as progress
from kfac_edit.progress import LogLines, progress_bar


def test_log_lines_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress, "_interactive", lambda: False)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # every update is due
    caplog.set_level(logging.INFO, logger="kfac_edit.progress")
    with progress_bar(total=4000, desc="collecting factors", unit="tok", unit_scale=True, disable=None) as bar:
        assert isinstance(bar, LogLines)
        for _ in range(4):
            bar.update(1000)
        bar.set_postfix(found=3, refresh=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("collecting factors: 1.00k/4.00k tok (25%), ") and " tok/s, " in lines[0]
    assert lines[0].endswith(" left")
    assert lines[-1].startswith("collecting factors: 4.00k/4.00k tok (100%)")
    assert lines[-1].endswith(", found=3, done")
    assert len(lines) == 5  # one per update, one at the end

    caplog.clear()
    assert list(progress_bar((i for i in range(3)), desc="points", unit="point")) == [0, 1, 2]  # no total known
    assert caplog.records and all(r.getMessage().startswith("points: ") for r in caplog.records)
    assert caplog.records[-1].getMessage().startswith("points: 3 point, ")
    assert " left" not in caplog.records[-1].getMessage()


def test_quiet_loops_and_disabled_bars(monkeypatch, caplog):
    monkeypatch.setattr(progress, "_interactive", lambda: False)
    caplog.set_level(logging.INFO, logger="kfac_edit.progress")
    for _ in progress_bar(range(100), desc="fast"):  # a loop shorter than LOG_INTERVAL_S logs nothing
        pass
    for _ in progress_bar(range(100), desc="off", disable=True):
        pass
    assert caplog.records == []
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    for _ in progress_bar(range(5), desc="off", disable=True):  # --no-progress: not even log lines
        pass
    assert caplog.records == []
    monkeypatch.setattr(progress, "_interactive", lambda: True)
    bar = progress_bar(range(2), desc="tty")
    assert type(bar) is not LogLines and not bar.disable  # a terminal gets tqdm's own bar
    bar.close()


def test_no_progress_is_an_option_of_every_command_and_switches_every_bar_off(monkeypatch):
    import kfac_edit.progress as progress
    from kfac_edit.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert all("--no-progress" in p._option_string_actions for p in sub.choices.values())
    monkeypatch.setattr(progress, "_interactive", lambda: False)
    try:
        assert main(["report", "--no-progress", "/nonexistent-kfac-dir"]) == 2  # parsed; the run fails on the dir
        assert progress.progress_bar(range(3), total=3).disable is True
        progress.switch_off(False)
        assert isinstance(progress.progress_bar(range(3), total=3), progress.LogLines)
    finally:
        progress.switch_off(False)
