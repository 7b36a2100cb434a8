"""Errors raised for bad input, before any long work starts."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: says which file and field is wrong and how to fix it.

    Parameters
    ----------
    path : str or None
        The file at fault (None when the problem is a command-line value).
    problem : str
        What is wrong, with the value received and the value allowed.
    fix : str
        What the user should do.
    """

    def __init__(self, path, problem: str, fix: str = "") -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        tail = f" Fix: {fix}" if fix else ""
        super().__init__(f"{where}{problem}.{tail}")
