"""Subcommands of the ``kfac-edit`` CLI, one module each (see :mod:`kfac_edit.cli`)."""
