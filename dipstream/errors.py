"""The one error type users see: a one-line message that says what is wrong and how to fix it."""

from __future__ import annotations

from contextlib import contextmanager


class DipstreamError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with status 2."""

    exit_code = 2


class Interrupted(DipstreamError):
    """Stopped by the user (Ctrl-C, SIGTERM) after saving what was finished; exit status 130."""

    exit_code = 130


@contextmanager
def user_errors():
    """Inside this block a ValueError (the simulator's and the parsers' way to say "bad input")
    becomes a one-line DipstreamError."""
    try:
        yield
    except ValueError as exc:
        raise DipstreamError(" ".join(str(exc).split())) from None


def did_you_mean(word: str, choices, quote: str = "'", cutoff: float = 0.6) -> str:
    """The hint `did you mean 'x'?` naming the closest of `choices` to a mistyped `word`, or ""
    when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f"did you mean {quote}{close[0]}{quote}?" if close else ""
