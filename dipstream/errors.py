"""The one error type users see: a one-line message that says what is wrong and how to fix it."""

from __future__ import annotations

from contextlib import contextmanager


class DipstreamError(Exception):
    """A user-facing error; the CLI prints its message and exits with status 2. The message is one
    line whatever it quotes (a user's key or file name with a newline in it: its whitespace runs
    become single spaces)."""

    exit_code = 2

    def __init__(self, message: object = "", *args):
        super().__init__(" ".join(str(message).split()), *args)


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
        raise DipstreamError(str(exc)) from None


def did_you_mean(word: str, choices, quote: str = "'", cutoff: float = 0.6) -> str:
    """The hint `did you mean 'x'?` naming the closest of `choices` to a mistyped `word`, or ""
    when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f"did you mean {quote}{close[0]}{quote}?" if close else ""
