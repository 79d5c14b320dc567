"""Fixed-length token windows: BOS followed by seq_len - 1 tokens of the text, non-overlapping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dipstream.errors import DipstreamError


@dataclass
class Windows:
    """input_ids (n_windows, seq_len) with BOS first; bytes of the text each window predicts."""

    input_ids: torch.Tensor
    predicted_bytes: list[int]

    @property
    def n_predicted(self) -> int:
        return self.input_ids.shape[0] * (self.input_ids.shape[1] - 1)


def make_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None,
                 max_positions: int | None = None) -> Windows:
    """Cut `text` into windows of `seq_len` tokens (BOS + seq_len - 1); `max_tokens` caps predicted tokens."""
    if seq_len < 2:
        raise DipstreamError(f"--seq-len {seq_len} is too small; use at least 2")
    if max_positions is not None and seq_len > max_positions:
        raise DipstreamError(f"--seq-len {seq_len} exceeds the model's context of {max_positions}; lower it")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = seq_len - 1
    n = len(ids) // body
    if max_tokens is not None:
        if max_tokens < body:
            raise DipstreamError(f"--tokens {max_tokens} is less than one window of {body} predicted "
                                 f"tokens; raise --tokens or lower --seq-len")
        n = min(n, max_tokens // body)
    if n == 0:
        raise DipstreamError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                             f"use a longer text or a smaller --seq-len")
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    rows, nbytes = [], []
    for w in range(n):
        chunk = ids[w * body:(w + 1) * body]
        rows.append([bos] + chunk)
        nbytes.append(len(tokenizer.decode(chunk).encode("utf-8")))
    return Windows(torch.tensor(rows, dtype=torch.long), nbytes)
