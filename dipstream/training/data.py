"""Training and validation windows, in a deterministic order that a resumed run can replay."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dipstream.data import load_text, make_windows
from dipstream.data.corpora import file_documents
from dipstream.errors import DipstreamError


@dataclass
class TrainData:
    """Training windows (n, seq_len) and validation windows."""

    train: torch.Tensor
    val: torch.Tensor
    seed: int

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Windows of `step`: consecutive slices of per-epoch permutations (seeded by epoch)."""
        n = self.train.shape[0]
        rows, perms = [], {}
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(
                    n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            rows.append(int(perms[epoch][pos]))
        return self.train[rows]


def _texts(corpus: str, train_text: str | None) -> tuple[str, str, str]:
    if train_text is None:
        return load_text(corpus, "train"), load_text(corpus, "val"), f"the {corpus} train split"
    docs = file_documents(train_text)
    cut = max(1, int(0.9 * len(docs))) if len(docs) > 1 else None
    if cut is None:  # one paragraph: split its characters
        text = docs[0]
        return text[:int(0.9 * len(text))], text[int(0.9 * len(text)):], f"'{train_text}'"
    return "\n\n".join(docs[:cut]), "\n\n".join(docs[cut:]), f"'{train_text}'"


def load_train_data(tokenizer, corpus: str, train_text: str | None, seq_len: int, steps: int,
                    batch_size: int, max_epochs: float, val_tokens: int, seed: int,
                    max_positions: int | None = None) -> TrainData:
    """Tokenized training/validation windows, refusing a text too small for the requested steps."""
    if steps < 1 or batch_size < 1:
        raise DipstreamError(f"--steps {steps} and --batch-size {batch_size} must be at least 1")
    train_txt, val_txt, what = _texts(corpus, train_text)
    try:
        train = make_windows(tokenizer, train_txt, seq_len, max_positions=max_positions).input_ids
    except DipstreamError:
        raise DipstreamError(f"{what} is too small for one training window of {seq_len} tokens; give "
                             "more text (--train-text) or lower --seq-len") from None
    n = train.shape[0]
    need = steps * batch_size
    if n < batch_size or need > max_epochs * n:
        raise DipstreamError(
            f"{what} has {n} windows of {seq_len} tokens; {steps} steps x {batch_size} windows would "
            f"pass over it {need / n:.1f} times (limit --max-epochs {max_epochs:g}); lower --steps "
            "or --batch-size, or give more text")
    try:
        val = make_windows(tokenizer, val_txt, seq_len, max(val_tokens, seq_len - 1),
                           max_positions).input_ids
    except DipstreamError:
        raise DipstreamError(f"the validation part of {what} is shorter than one window of {seq_len} "
                             "tokens; give more text or lower --seq-len") from None
    return TrainData(train, val, seed)
