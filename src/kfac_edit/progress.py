"""One progress helper for every loop that can take more than a few seconds.

:func:`progress_bar` takes tqdm's arguments and returns a tqdm bar (``tqdm.auto``) when stderr is a terminal or a
notebook runs the code; elsewhere (a Slurm log, ``2> file``, a pipe) a :class:`LogLines` that draws nothing and logs
one line every :data:`LOG_INTERVAL_S` seconds at INFO on the ``kfac_edit.progress`` logger, and a last line when a
loop that logged ends, e.g.::

    collecting factors: 1.23M/20.0M tok (6%), 41.2k tok/s, 00:30 elapsed, 06:47 left

``disable=True`` (or :func:`switch_off`, the commands' ``--no-progress``) turns both off; ``disable=None``
(tqdm's "only on a terminal") means "a bar on a terminal, log lines elsewhere".
"""

from __future__ import annotations

import io
import logging
import sys

from tqdm import std as _tqdm_std

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0  # seconds between two log lines when stderr is not a terminal
_switched_off = False  # every command's --no-progress (set by the CLI through switch_off)


class LogLines(_tqdm_std.tqdm):
    """A tqdm that logs a progress line every :data:`LOG_INTERVAL_S` seconds instead of drawing a bar."""

    def __init__(self, *args, **kwargs):
        kwargs.update(disable=False, file=io.StringIO(), mininterval=LOG_INTERVAL_S, dynamic_ncols=False)
        kwargs.pop("position", None)
        self._closing, self._lines = False, 0  # closing: no regular line; lines logged so far
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):  # tqdm calls this at most every mininterval seconds
        if not self._closing and self.n != self.initial:
            self._lines += 1
            log.info("%s", self.line())
        return True

    def close(self):
        if self.disable:
            return
        self._closing = True
        if self._lines:  # a loop that logged along the way also logs where it ended
            log.info("%s, done", self.line(done=True))
        super().close()

    def line(self, done: bool = False) -> str:
        """``desc: done/total unit (pct%), rate unit/s, elapsed, left[, postfix]``."""
        d = self.format_dict
        n, total, elapsed, unit = d["n"], d["total"], d["elapsed"], d["unit"]

        def amount(x: float) -> str:
            return self.format_sizeof(x, divisor=d["unit_divisor"]) if d["unit_scale"] else f"{x:,.0f}"

        rate = (n - d["initial"]) / elapsed if elapsed > 0 else None
        parts = [f"{amount(n)}/{amount(total)} {unit} ({100 * n / total:.0f}%)" if total else f"{amount(n)} {unit}",
                 f"{amount(rate)} {unit}/s" if rate else f"? {unit}/s", f"{self.format_interval(elapsed)} elapsed"]
        if total and rate and not done:
            parts.append(f"{self.format_interval(max(total - n, 0) / rate)} left")
        if d["postfix"]:  # what the loop adds with set_postfix (a loss, a count found, the last sweep point)
            parts.append(str(d["postfix"]))
        return (f"{self.desc.rstrip(': ')}: " if self.desc else "") + ", ".join(parts)


def _interactive() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def switch_off(off: bool = True) -> None:
    """Turn every progress bar and progress line of this process off (``--no-progress``) or back on."""
    global _switched_off
    _switched_off = bool(off)


def progress_bar(*args, **kwargs):
    """A tqdm bar on a terminal, :class:`LogLines` elsewhere, nothing with ``disable=True`` or after switch_off."""
    from tqdm.auto import tqdm

    if _switched_off or kwargs.get("disable") is True:
        return tqdm(*args, **{**kwargs, "disable": True})
    if _interactive():
        return tqdm(*args, **{**kwargs, "disable": False})
    return LogLines(*args, **kwargs)
