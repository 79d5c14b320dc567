"""Text in and out of the lean engine at little resident memory: the prompt is encoded with the
`tokenizers` library, which is then released (a loaded 50k-vocabulary tokenizer holds ~25 MB);
generated ids are turned into text from a table of each token's bytes (byte-level BPE and
SentencePiece-style byte-fallback vocabularies)."""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path

import numpy as np

from dipstream.errors import DipstreamError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-ins back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TokenText:
    """Token ids -> text, from each token's bytes (special tokens give none)."""

    def __init__(self, pieces: list[bytes]):
        self.offsets = np.zeros(len(pieces) + 1, np.int64)
        self.offsets[1:] = np.cumsum([len(p) for p in pieces])
        self.blob = b"".join(pieces)

    @classmethod
    def from_tokenizer(cls, tok) -> "TokenText":
        """From a loaded `tokenizers.Tokenizer`."""
        import json

        decoder = json.loads(tok.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        special = {i for i, a in tok.get_added_tokens_decoder().items() if a.special}
        byte_level = _byte_level_decoder() if "ByteLevel" in kinds else None
        pieces = []
        for i in range(tok.get_vocab_size(with_added_tokens=True)):
            s = tok.id_to_token(i)
            if s is None or i in special:
                pieces.append(b"")
            elif byte_level is not None:
                pieces.append(bytes(byte_level.get(c, 32) for c in s))
            elif (m := _BYTE_TOKEN.match(s)) and "ByteFallback" in kinds:
                pieces.append(bytes([int(m.group(1), 16)]))
            else:
                pieces.append(s.replace("\u2581", " ").encode())
        return cls(pieces)

    def bytes_of(self, ids) -> bytes:
        o = self.offsets
        return b"".join(self.blob[o[i]:o[i + 1]] for i in ids if 0 <= i < len(o) - 1)

    def decode(self, ids) -> str:
        return self.bytes_of(ids).decode("utf-8", errors="replace")


def encode_and_release(tokenizer_file: Path, prompt: str) -> tuple[list[int], TokenText]:
    """The prompt's ids and the decoding table; the tokenizer itself is freed."""
    import tokenizers

    if not Path(tokenizer_file).is_file():
        raise DipstreamError(f"{tokenizer_file} is missing: the model needs a fast tokenizer (tokenizer.json) "
                             "in its checkpoint folder; export it from a checkpoint that has one")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    ids = tok.encode(prompt).ids
    text = TokenText.from_tokenizer(tok)
    del tok
    _release_memory()
    return list(ids), text
