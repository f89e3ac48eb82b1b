"""The one exception type for user mistakes."""


class UserError(Exception):
    """Bad input from the user: a single line that names the problem and the fix. The CLI prints it as
    ``kfac-edit: error: <message>`` and exits with code 2, without a traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
