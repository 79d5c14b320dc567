"""Text in and out of a generate run, for both front ends: the prompt's ids (the chat template
where asked), the end-of-sequence ids, and the text of generated ids as it comes. Read from a
folder holding the model's tokenizer files (the engine's model folder, or a checkpoint folder)."""

from __future__ import annotations

import json
from pathlib import Path

from dipstream.engine.text import encode_and_release
from dipstream.errors import DipstreamError


def encode_prompt(folder: Path, prompt: str, chat: bool) -> tuple[list[int], object]:
    """(the prompt's ids, ids -> text) from the tokenizer in `folder`: the engine's own tokenizer
    (little resident memory), or transformers' for a chat template."""
    if chat:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        if not getattr(tok, "chat_template", None):
            raise DipstreamError(f"the tokenizer in {folder} has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        ids, decode = list(ids), (lambda t: tok.decode(t, skip_special_tokens=True))
    else:
        ids, text = encode_and_release(Path(folder) / "tokenizer.json", prompt)
        decode = text.decode
    if not ids:
        raise DipstreamError("the prompt is empty after tokenization; give some text")
    return ids, decode


def eos_ids(folder: Path, config_eos=None) -> set[int]:
    """End-of-sequence ids: the config's and generation_config.json's in `folder`."""
    eos = set()
    gen = Path(folder) / "generation_config.json"
    for e in [config_eos] + ([json.loads(gen.read_text()).get("eos_token_id")] if gen.is_file() else []):
        eos.update(e if isinstance(e, (list, tuple)) else ([] if e is None else [e]))
    return eos


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
