"""The one exception type users see.

Raise :class:`TLCMError` for anything a user can fix (a bad path, an empty prompt file, a step count out of range).
The message must name the problem *and* the fix. The CLI prints it without a traceback and exits with status 2.
Internal invariants stay ``assert``s: those are our bugs, and a traceback is what we want for them.
"""

from __future__ import annotations


class TLCMError(Exception):
    """A user-facing error whose message says what went wrong and what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
