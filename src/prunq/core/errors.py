"""Errors that mean "the user's input is wrong" (the CLI turns them into one line and exit code 2)."""

from __future__ import annotations


class PrunqError(ValueError):
    """Bad input: a recipe field, a model without prunable layers, a missing or corrupt run directory.

    The message names the field or file and says what is wrong.
    """
