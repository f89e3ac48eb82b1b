"""The one exception type for user mistakes."""

import re


class UserError(Exception):
    """Bad input from the user: a single line that names the problem and the fix. The CLI prints it as
    ``kfac-edit: error: <message>`` and exits with code 2, without a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words (torch's own message is a paragraph that
    advises ``weights_only=False``): the file is empty or truncated, is no ``torch.save`` file, or holds objects
    beyond tensors and plain containers."""
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please|\n\n|$)", str(exc), re.S)
    if found is None:
        return first_line(exc)
    detail = " ".join(found.group(1).split())
    if detail.startswith("Unsupported global"):
        return f"it holds Python objects, not only tensors ({detail})"
    return f"it is not a file torch.save wrote ({detail})"
