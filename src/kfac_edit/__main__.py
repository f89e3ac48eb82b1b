"""``python -m kfac_edit ...`` is ``kfac-edit ...`` (for environments where the console script is not on PATH)."""

from .cli import entry

if __name__ == "__main__":
    entry()
