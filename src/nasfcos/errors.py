"""The one exception type for mistakes a user can make.

Everything a user can get wrong (a bad path, a malformed annotation file, an invalid genotype, an unknown
config key) raises :class:`UserError`. The command line catches it, prints its one-line message and exits
with status 2; library callers can catch it too. Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, described in one line that names the file, field and value."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
