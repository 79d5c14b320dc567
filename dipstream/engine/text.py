"""Text in and out of a generate run at little resident memory: the prompt's ids (the chat
template where asked), the end-of-sequence ids and the generated text as it comes, for the engine
and the Hugging Face front end alike, read from a folder holding the model's tokenizer files.

The `tokenizers` library holds a loaded BPE vocabulary in a lot of RAM (SmolLM2's 49k tokens:
~30 MB; Gemma 3's 262k tokens and 515k merges: ~370 MB at peak), more than a memory-capped run
can give it. So at export the tokenizer is also written as arrays (`LeanTokenizer`): each
token's bytes (decoding), the merges as sorted (left, right) pair keys with their rank and result
(encoding), the initial symbols, the added tokens and the template's prefix. It encodes the two
BPE kinds of the supported families (GPT-2 byte-level with its split pattern, or with a split
regex of its own before the byte mapping as Qwen2's; SentencePiece-style with the space replaced by
U+2581 and byte fallback) and is written only when it gives the
`tokenizers` library's ids on a sample text; otherwise the engine loads `tokenizers`, encodes the
prompt and releases it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dipstream.devices import release_memory
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


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in of each byte 0..255."""
    inv = {b: c for c, b in _byte_level_decoder().items()}
    return [inv[b] for b in range(256)]


class TokenText:
    """Token ids -> text, from each token's bytes (special tokens give none)."""

    def __init__(self, pieces: list[bytes]):
        self.offsets = np.zeros(len(pieces) + 1, np.int64)
        self.offsets[1:] = np.cumsum([len(p) for p in pieces])
        self.blob = b"".join(pieces)

    @classmethod
    def from_tokenizer(cls, tok) -> "TokenText":
        """From a loaded `tokenizers.Tokenizer`."""
        decoder = json.loads(tok.to_str()).get("decoder") or {}
        special = {i for i, a in tok.get_added_tokens_decoder().items() if a.special}
        tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size(with_added_tokens=True))]
        return cls.from_tokens(tokens, special, decoder)

    @classmethod
    def from_json(cls, tok_json: dict) -> "TokenText":
        """From a parsed tokenizer.json (its vocabulary and added tokens), without `tokenizers`."""
        added = tok_json.get("added_tokens") or []
        ids = list(tok_json["model"]["vocab"].items()) + [(a["content"], a["id"]) for a in added]
        tokens: list[str | None] = [None] * (max((i for _, i in ids), default=-1) + 1)
        for t, i in ids:
            tokens[i] = t
        return cls.from_tokens(tokens, {a["id"] for a in added if a.get("special")}, tok_json.get("decoder") or {})

    @classmethod
    def from_tokens(cls, tokens: list, special: set[int], decoder: dict) -> "TokenText":
        """Each token's bytes, as the tokenizer's `decoder` spells them (GPT-2 byte characters,
        SentencePiece's U+2581 and <0xNN> byte tokens); special tokens give none."""
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        byte_level = _byte_level_decoder() if "ByteLevel" in kinds else None
        pieces = []
        for i, s in enumerate(tokens):
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


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MAX_SPLIT = 4096  # characters of a stored split regex (Qwen2's: 103)
LEAN_FILE = "tokenizer_lean.npz"
SAMPLE = ("The history of the city begins with a small settlement of 1,250 people in 1843; its name "
          "comes from the river.\n\nÉtude n° 3 — naïve café, 東京 and Ελλάδα! Don't we'll they're "
          "x^2 + y_1 = 42.5%  tabs\tand    spaces, <html> {json: [1, 2]} émigré façade coöperate.")


ARRAYS = ("offsets", "blob", "pair_keys", "pair_rank", "pair_merged", "sym_chars", "sym_ids")


def _check_lean(arrays: dict, meta: dict) -> None:
    """ValueError unless the lean tokenizer's arrays and metadata are consistent."""
    if not isinstance(meta, dict) or meta.get("kind") not in ("byte_level", "sentencepiece"):
        raise ValueError("kind")
    V = meta["vocab_size"]
    if isinstance(V, bool) or not isinstance(V, int) or not 0 < V <= 1 << 22:
        raise ValueError("vocab_size")
    kinds = {"offsets": "iu", "blob": "u", "pair_keys": "iu", "pair_rank": "iu", "pair_merged": "iu",
             "sym_chars": "u", "sym_ids": "iu"}
    for k, kind in kinds.items():
        a = arrays[k]
        if a.ndim != 1 or a.dtype.kind not in kind:
            raise ValueError(k)
    off, n = arrays["offsets"], arrays["blob"].size
    if off.size != V + 1 or off[0] != 0 or off[-1] != n or (np.diff(off.astype(np.int64)) < 0).any():
        raise ValueError("offsets")
    pk, pr, pm = arrays["pair_keys"], arrays["pair_rank"], arrays["pair_merged"]
    if not pk.size == pr.size == pm.size or (pk.size and ((pk < 0).any() or (pk >= V * V).any()
                                                          or (np.diff(pk.astype(np.int64)) < 0).any())):
        raise ValueError("pairs")
    for k in ("pair_rank", "pair_merged", "sym_ids"):
        a, hi = arrays[k], (pk.size if k == "pair_rank" else V)
        if a.size and ((a < 0).any() or (a >= hi).any()):
            raise ValueError(k)
    if len(arrays["sym_chars"].tobytes().decode("utf-8")) != arrays["sym_ids"].size:
        raise ValueError("sym_chars")
    ids = list(meta["prefix"]) + [i for _, i in meta["added"]] + [i for i in (meta.get("byte_ids") or []) if i is not None]
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < V for i in ids) or \
            any(not isinstance(c, str) or not c for c, _ in meta["added"]):
        raise ValueError("ids")
    if "split" in meta:
        split_regex(meta)


def split_regex(meta: dict):
    """The compiled split regex of a byte-level tokenizer (meta["split"]; GPT-2's when absent);
    ValueError for one that is not a bounded string `regex` compiles."""
    import regex

    r = meta.get("split", GPT2_SPLIT)
    if not isinstance(r, str) or not 0 < len(r) <= MAX_SPLIT:
        raise ValueError("split")
    try:
        return regex.compile(r)
    except (regex.error, RecursionError, OverflowError):
        raise ValueError("split") from None


def _split_words(rx, text: str) -> list[str]:
    """`text` cut by the regex as the `Split` pre-tokenizer with behavior Isolated cuts it: each
    match a piece, and the text between matches too."""
    out, pos = [], 0
    for m in rx.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        pos = max(pos, m.end())
    if pos < len(text):
        out.append(text[pos:])
    return out


def _own_split(pre: dict) -> str | None:
    """The regex of a byte-level pre-tokenizer that splits with a regex of its own first (Qwen2's:
    Sequence[Split(Regex, Isolated), ByteLevel without prefix space or regex]); None otherwise."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2:
        return None
    split, byte_level = steps
    pattern = split.get("pattern") or {}
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") or \
            set(pattern) != {"Regex"} or byte_level.get("type") != "ByteLevel" or \
            byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
        return None
    try:
        split_regex({"split": pattern["Regex"]})
    except ValueError:
        return None
    return pattern["Regex"]


class LeanTokenizer:
    """BPE encoding and decoding from arrays (see the module docstring)."""

    def __init__(self, arrays: dict, meta: dict):
        self.meta = meta
        self.text = TokenText.__new__(TokenText)
        self.text.offsets, self.text.blob = arrays["offsets"], bytes(arrays["blob"])
        self.keys, self.rank, self.merged = arrays["pair_keys"], arrays["pair_rank"], arrays["pair_merged"]
        self.V = int(meta["vocab_size"])
        sym = arrays["sym_chars"].tobytes().decode("utf-8")
        self.sym = dict(zip(sym, arrays["sym_ids"].tolist()))
        self.added = [(c, i) for c, i in meta["added"]]
        self._split = None
        self._words = None

    # ------------------------------------------------------------------ build
    @classmethod
    def from_json(cls, tok_json: dict, hf_tokenizer=None) -> "LeanTokenizer | None":
        """From tokenizer.json (parsed); None for a kind it does not encode, or, given the loaded
        `tokenizers.Tokenizer`, for one whose ids on a sample text differ from it (`agrees`)."""
        m = tok_json.get("model") or {}
        if m.get("type") != "BPE" or m.get("dropout") or m.get("continuing_subword_prefix") or \
                m.get("end_of_word_suffix") or m.get("ignore_merges"):
            return None
        pre, norm = tok_json.get("pre_tokenizer") or {}, tok_json.get("normalizer") or {}
        split = None
        if pre.get("type") == "ByteLevel" and not norm and not pre.get("add_prefix_space") and pre.get("use_regex", True):
            kind = "byte_level"
        elif not norm and (split := _own_split(pre)) is not None:
            kind = "byte_level"
        elif norm == {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"} and m.get("byte_fallback") \
                and pre in ({}, {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                                 "invert": False}):
            kind = "sentencepiece"
        else:
            return None
        vocab = m["vocab"]
        text = TokenText.from_json(tok_json)
        V = len(text.offsets) - 1
        merges = [tuple(x.split(" ", 1)) if isinstance(x, str) else tuple(x) for x in m["merges"]]
        left = np.array([vocab[a] for a, _ in merges], np.int64)
        right = np.array([vocab[b] for _, b in merges], np.int64)
        out = np.array([vocab[a + b] for a, b in merges], np.int64)
        keys = left * V + right
        order = np.argsort(keys, kind="stable")
        if kind == "byte_level":
            chars = list(_byte_level_decoder())
        else:
            chars = [t for t in vocab if len(t) == 1]
        sym_ids = np.array([vocab[c] for c in chars if c in vocab], np.int32)
        chars = [c for c in chars if c in vocab]
        prefix = []
        post = tok_json.get("post_processor") or {}
        if post.get("type") == "TemplateProcessing":
            for item in post["single"]:
                if "SpecialToken" in item:
                    prefix += post["special_tokens"][item["SpecialToken"]["id"]]["ids"]
                elif "Sequence" in item:
                    break
        elif post and post.get("type") != "ByteLevel":
            return None
        added = [(a["content"], a["id"]) for a in tok_json.get("added_tokens", [])
                 if not a.get("normalized") and not a.get("lstrip") and not a.get("rstrip") and not a.get("single_word")]
        arrays = {"offsets": text.offsets, "blob": np.frombuffer(text.blob, np.uint8),
                  "pair_keys": keys[order], "pair_rank": order.astype(np.int32), "pair_merged": out[order].astype(np.int32),
                  "sym_chars": np.frombuffer("".join(chars).encode("utf-8"), np.uint8), "sym_ids": sym_ids}
        meta = {"kind": kind, "vocab_size": V, "prefix": prefix, "added": added,
                "byte_fallback": bool(m.get("byte_fallback")),
                "byte_ids": [vocab.get(f"<0x{b:02X}>") for b in range(256)] if kind == "sentencepiece" else None}
        if split is not None:
            meta["split"] = split
        lean = cls(arrays, meta)
        lean._arrays = arrays
        return lean if hf_tokenizer is None or lean.agrees(sample_reference(hf_tokenizer)) else None

    def agrees(self, reference: tuple[int, list[int]]) -> bool:
        """Whether this is `sample_reference`'s vocabulary size and sample ids."""
        return (self.V, self.encode(SAMPLE)) == tuple(reference)

    def save(self, directory: Path) -> None:
        from dipstream.io import atomic_path

        with atomic_path(Path(directory) / LEAN_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, meta=np.frombuffer(json.dumps(self.meta).encode(), np.uint8), **self._arrays)

    @classmethod
    def load(cls, directory: Path) -> "LeanTokenizer":
        """The tokenizer of `directory`, read as data only (no pickles) and checked: every array of
        its kind and range, every id inside the vocabulary (one-line error otherwise)."""
        import zipfile

        path = Path(directory) / LEAN_FILE
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ARRAYS}
                meta = json.loads(z["meta"].tobytes().decode())
            _check_lean(arrays, meta)
            return cls(arrays, meta)
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, UnicodeDecodeError,
                zipfile.BadZipFile) as e:
            raise DipstreamError(f"{path} is damaged ({type(e).__name__}); delete {Path(directory)} and export the "
                                 "model again") from None

    # ------------------------------------------------------------------ encode
    def _pieces(self, text: str):
        """(text, None) pieces to encode and (None, id) added tokens, in order."""
        if not self.added:
            return [(text, None)]
        if self._split is None:
            import re

            alts = sorted((c for c, _ in self.added), key=len, reverse=True)
            self._split = (re.compile("|".join(re.escape(c) for c in alts)), dict(self.added))
        rx, ids = self._split
        out, pos = [], 0
        for mt in rx.finditer(text):
            if mt.start() > pos:
                out.append((text[pos:mt.start()], None))
            out.append((None, ids[mt.group()]))
            pos = mt.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def _bpe(self, ids: list[int]) -> list[int]:
        """Merge the lowest-rank adjacent pair (leftmost first) until none merges."""
        V, keys, rank, merged = self.V, self.keys, self.rank, self.merged
        while len(ids) > 1:
            a = np.array(ids, np.int64)
            k = a[:-1] * V + a[1:]
            j = np.searchsorted(keys, k)
            j = np.minimum(j, keys.size - 1)
            ok = keys[j] == k
            if not ok.any():
                break
            r = np.where(ok, rank[j], np.iinfo(np.int32).max)
            p = int(np.argmin(r))
            ids = ids[:p] + [int(merged[j[p]])] + ids[p + 2:]
        return ids

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """The ids of `text`, after the tokenizer's prefix (its BOS) unless not `add_special`."""
        ids = list(self.meta["prefix"]) if add_special else []
        for piece, tid in self._pieces(text):
            if tid is not None:
                ids.append(tid)
            elif self.meta["kind"] == "byte_level":
                if self._words is None:
                    self._words = (split_regex(self.meta), byte_chars())
                rx, byte_char = self._words
                for word in _split_words(rx, piece):
                    ids += self._bpe([self.sym[byte_char[b]] for b in word.encode("utf-8")])
            else:
                syms = []
                for ch in piece.replace(" ", "\u2581"):
                    if ch in self.sym:
                        syms.append(self.sym[ch])
                    else:  # byte fallback
                        syms += [self.meta["byte_ids"][b] for b in ch.encode("utf-8")]
                ids += self._bpe(syms)
        return ids

    def decode(self, ids) -> str:
        return self.text.decode(ids)


def sample_reference(hf_tokenizer) -> tuple[int, list[int]]:
    """What a lean tokenizer must reproduce of a `tokenizers.Tokenizer`: its vocabulary's size
    (added tokens included) and its ids on the sample text."""
    return hf_tokenizer.get_vocab_size(with_added_tokens=True), hf_tokenizer.encode(SAMPLE).ids


def write_lean_tokenizer(directory: Path) -> bool:
    """At export: write `LEAN_FILE` beside tokenizer.json when the lean encoder reproduces it. The
    reference (`tokenizers`' vocabulary size and ids on the sample) and the parsed file are held one
    after the other, not together (Qwen 1.5B's vocabulary: about 120 and 70 MB)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return False
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(path))
    reference = sample_reference(tok)
    del tok
    release_memory()
    lean = LeanTokenizer.from_json(json.loads(path.read_text()))
    release_memory()
    if lean is None or not lean.agrees(reference):
        return False
    lean.save(directory)
    return True


class FolderTokenizer:
    """A model folder's tokenizer: the lean one when the export wrote it (little resident memory),
    else `tokenizers` from tokenizer.json; `decode` from the decoding table alone."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if (folder / LEAN_FILE).is_file():
            self._tok = LeanTokenizer.load(folder)
            self.text = self._tok.text
            self._encode = self._tok.encode
            return
        import tokenizers

        if not (folder / "tokenizer.json").is_file():
            raise DipstreamError(f"{folder / 'tokenizer.json'} is missing: the model needs a fast tokenizer "
                                 "(tokenizer.json) in its checkpoint folder; export it from a checkpoint that has one")
        self._tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.text = TokenText.from_tokenizer(self._tok)
        self._encode = lambda text, add_special: list(self._tok.encode(text, add_special_tokens=add_special).ids)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """`text`'s ids; `add_special`: the tokenizer's BOS prefix."""
        return self._encode(text, add_special)

    def decode(self, ids) -> str:
        return self.text.decode(ids)

    def release(self) -> TokenText:
        """Drop the encoder (its tables back to the system); the decoding table stays."""
        self._tok = self._encode = None
        release_memory()
        return self.text


def encode_and_release(tokenizer_file: Path, prompt: str, add_special: bool = True) -> tuple[list[int], TokenText]:
    """The prompt's ids and the decoding table, the encoder freed (a one-prompt run's resident memory)."""
    tok = FolderTokenizer(Path(tokenizer_file).parent)
    ids = tok.encode(prompt, add_special)
    return ids, tok.release()


# ------------------------------------------------------------------ a generate run's text

def encode_prompt(folder: Path, prompt: str, chat: bool) -> tuple[list[int], object]:
    """(the prompt's ids, ids -> text) from the tokenizer in `folder` (the engine's own: little
    resident memory), the prompt wrapped in the model's chat template where asked (`engine.chat`,
    as transformers' apply_chat_template renders and encodes it: no BOS added, the template writes it)."""
    if chat:
        from dipstream.engine.chat import render_chat

        prompt = render_chat(folder, [{"role": "user", "content": prompt}])
    ids, text = encode_and_release(Path(folder) / "tokenizer.json", prompt, add_special=not chat)
    if not ids:
        raise DipstreamError("the prompt is empty after tokenization; give some text")
    return ids, text.decode


def eos_ids(folder: Path, config_eos=None) -> set[int]:
    """End-of-sequence ids: the config's and generation_config.json's in `folder` (one-line error
    for a file that is not JSON or whose eos_token_id is not an id or a list of ids)."""
    eos = set()
    gen = Path(folder) / "generation_config.json"
    found = [config_eos]
    if gen.is_file():
        try:
            doc = json.loads(gen.read_text())
            found.append(doc.get("eos_token_id") if isinstance(doc, dict) else [""])
        except (OSError, ValueError) as e:
            raise DipstreamError(f"{gen} is not readable JSON ({type(e).__name__}); fix or delete it") from None
    for e in found:
        ids = e if isinstance(e, (list, tuple)) else ([] if e is None else [e])
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise DipstreamError(f"{gen}: eos_token_id must be a token id or a list of them; fix or delete it")
        eos.update(ids)
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
