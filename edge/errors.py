"""EdgeError: a user-facing failure. The CLI prints its message and hint and exits 2."""

from __future__ import annotations


class EdgeError(Exception):
    """Bad input or environment: what went wrong, and what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"
