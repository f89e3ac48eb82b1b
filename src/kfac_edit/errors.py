"""The one exception type for user mistakes."""


class UserError(Exception):
    """Bad input from the user: a single line that names the problem and the fix. The CLI prints it as
    ``kfac-edit: error: <message>`` and exits with code 2, without a traceback."""
