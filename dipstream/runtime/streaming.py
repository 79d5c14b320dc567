"""Printing generated text as it comes (both engines)."""

from __future__ import annotations


def text_streamer(out, decode, enabled: bool, prompt: str = ""):
    """An on_token(ids) callback that writes the new part of decode(ids) to `out` (after `prompt`,
    written now); does nothing when not `enabled`."""
    printed = [""]
    if enabled and prompt:
        out.write(prompt)
        out.flush()

    def on_token(ids):
        if not enabled:
            return
        text = decode(ids)
        out.write(text[len(printed[0]):] if text.startswith(printed[0]) else text)
        out.flush()
        printed[0] = text

    return on_token
