"""A GGUF's tokenizer written as tokenizer.json, tokenizer_config.json and chat_template.jinja,
without transformers or torch: the files transformers' GGUF converter saves
(`AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(...)`), to the same JSON.

The converter builds the tokenizer twice over (a builder class from the vocabulary, then the
architecture's tokenizer class around it) and holds the whole vocabulary and merge table as Python
and Rust objects at once (Gemma 3's 262k tokens and 515k generated merges: 974 MB peak resident,
15 s); the export has to stay light (here: 110 MB with the metadata, 2 s). So the same result is computed from the metadata directly: the vocabulary
(byte-level tokens respelled into GPT-2's byte alphabet; Gemma's space tokens as U+2581), the merges
(the file's, or generated from the vocabulary as `generate_merges` does, as id arrays), the added
tokens in the order and with the flags the two classes give them, the post-processor of the
add_bos / add_eos flags, and the architecture class's tokenizer_config. The model's vocabulary and
merges are streamed into the file.

Covered: tokenizer.ggml.model "gpt2" (byte-level BPE; the split regex of tokenizer.ggml.pre as
transformers' table has it) on the llama, qwen2, qwen3 and gemma3 architectures, and "llama"
SentencePiece on gemma3 (GemmaTokenizer) and llama (LlamaTokenizer). Anything else (another
tokenizer model or architecture, duplicate tokens, a merge outside the vocabulary) gives False and
writes nothing: the caller falls back to transformers.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import numpy as np

from dipstream.engine.text import byte_chars

# the architecture's tokenizer class in transformers (what AutoTokenizer picks for its config's
# model type; llama has none registered: the plain TokenizersBackend)
FINAL_CLASS = {"llama": "TokenizersBackend", "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
               "gemma3": "GemmaTokenizer"}
SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")  # map order
GGUF_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                    "pad_token": "padding_token_id"}
# the named special tokens each builder class defaults to (added before the file's own)
BUILDER_SPECIALS = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
              "mask_token": "<mask>"},
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when none is known

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN35_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' GGUF_PRE_TOKENIZER_SPLITS);
# any other value keeps the builder's pre-tokenizer
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_SPM_DECODE = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}]
# the builder classes' pipeline and BPE options, as tokenizers serializes them
PIPELINES = {
    "gpt2": {"normalizer": None, "pre_tokenizer": _BYTE_LEVEL, "decoder": dict(_BYTE_LEVEL, add_prefix_space=True),
             "model": {"unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                       "fuse_unk": False, "byte_fallback": False}},
    "gemma": {"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
              "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                                "invert": False},
              "decoder": {"type": "Sequence", "decoders": _SPM_DECODE},
              "model": {"unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None,
                        "fuse_unk": True, "byte_fallback": True}},
    "llama": {"normalizer": None,
              "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                "split": False},
              "decoder": {"type": "Sequence", "decoders": _SPM_DECODE + [{"type": "Strip", "content": " ", "start": 1,
                                                                           "stop": 0}]},
              "model": {"unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                        "fuse_unk": True, "byte_fallback": True}},
}


class _Unsupported(Exception):
    """A tokenizer this module does not reproduce."""


class _AddedTokens:
    """The added-token table of a `tokenizers.Tokenizer` as add_tokens changes it: a content already
    added with the same flags is left alone, with other flags replaced in place; a new one takes its
    vocabulary id, or the next id past the vocabulary and the added tokens."""

    def __init__(self, vocab: dict[str, int], size: int):
        self.vocab, self.size = vocab, size
        self.table: dict[str, tuple[int, bool, bool]] = {}  # content -> (id, special, normalized)

    def add(self, content: str, special: bool, normalized: bool | None = None) -> None:
        if not content:
            return
        normalized = (not special) if normalized is None else normalized
        old = self.table.get(content)
        if old is not None:
            self.table[content] = (old[0], special, normalized)
            return
        tid = self.vocab.get(content)
        if tid is None:
            top = max((i for i, _, _ in self.table.values()), default=-1)
            tid = top + 1 if top >= self.size else self.size
        self.table[content] = (tid, special, normalized)

    def id_of(self, content: str) -> int | None:
        t = self.table.get(content)
        return t[0] if t is not None else self.vocab.get(content)

    def json(self) -> list[dict]:
        rows = sorted((i, c, s, n) for c, (i, s, n) in self.table.items())
        return [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": n,
                 "special": s} for i, c, s, n in rows]


def _spelling(meta: dict, builder: str) -> tuple[list[str], dict[int, str], dict[str, int]]:
    """(the file's tokens, {id: respelled token} where the builder respells one, {token: id})."""
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise _Unsupported("tokens")
    respelled: dict[int, str] = {}
    if builder == "gpt2":  # a token outside the byte alphabet is written in it, byte for byte
        chars = byte_chars()
        alphabet = frozenset(chars)
        for i, t in enumerate(tokens):
            if not alphabet.issuperset(t):
                respelled[i] = "".join(chars[b] for b in t.encode("utf-8"))
    elif builder == "gemma":  # a token of spaces is stored as spaces but looked up as U+2581s
        for i, t in enumerate(tokens):
            if " " in t and not t.strip():
                respelled[i] = "\u2581" * len(t)
    vocab = {respelled.get(i, t): i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise _Unsupported("duplicate tokens")
    return tokens, respelled, vocab


def _file_merges(merges, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The file's merges as (left ids, right ids); each side and the result in the vocabulary."""
    left, right = array("i"), array("i")
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else None
        if parts is None or len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or \
                parts[0] + parts[1] not in vocab:
            raise _Unsupported("merge outside the vocabulary")
        left.append(vocab[parts[0]])
        right.append(vocab[parts[1]])
    a, b = np.frombuffer(left, np.int32), np.frombuffer(right, np.int32)
    if a.size and np.unique(a.astype(np.int64) * len(vocab) + b).size != a.size:
        raise _Unsupported("duplicate merges")
    return a, b


def _generated_merges(tokens: list[str], respelled: dict[int, str], vocab: dict[str, int],
                      scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merges implied by the vocabulary (transformers' `generate_merges` with vocab_scores): every
    split of a token into two tokens, ordered by the token's score (high first), then the longer
    left part, the longer right part, the token's position."""
    left, right, owner, n_left = array("i"), array("i"), array("i"), array("i")
    for i, t in enumerate(tokens):
        t = respelled.get(i, t)
        for k in range(len(t) - 1, 0, -1):
            a = vocab.get(t[:k])
            if a is not None:
                b = vocab.get(t[k:])
                if b is not None:
                    left.append(a)
                    right.append(b)
                    owner.append(i)
                    n_left.append(k)
    owner_a, k_a = np.frombuffer(owner, np.int32), np.frombuffer(n_left, np.int32)
    lengths = np.fromiter((len(respelled.get(i, t)) for i, t in enumerate(tokens)), np.int64, len(tokens))
    order = np.lexsort((owner_a, -(lengths[owner_a] - k_a), -k_a.astype(np.int64), -scores[owner_a]))
    return np.frombuffer(left, np.int32)[order], np.frombuffer(right, np.int32)[order]


def _template(bos, bos_id, eos, eos_id, add_bos: bool, add_eos: bool) -> dict:
    """The TemplateProcessing `update_post_processor` sets for these flags."""
    def part(kind: str, name: str, type_id: int) -> dict:
        return {kind: {"id": name, "type_id": type_id}}

    single = ([part("SpecialToken", bos, 0)] if add_bos else []) + [part("Sequence", "A", 0)] + \
        ([part("SpecialToken", eos, 0)] if add_eos else [])
    pair = single + ([part("SpecialToken", bos, 1)] if add_bos else []) + [part("Sequence", "B", 1)] + \
        ([part("SpecialToken", eos, 1)] if add_eos else [])
    special = {}
    for flag, name, tid in ((add_bos, bos, bos_id), (add_eos, eos, eos_id)):
        if flag:
            special[name] = {"id": name, "ids": [tid], "tokens": [name]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def _builder(meta: dict) -> str:
    """The builder transformers' converter takes for this architecture and tokenizer model."""
    arch, kind = meta.get("general.architecture"), meta.get("tokenizer.ggml.model")
    if arch not in FINAL_CLASS:
        raise _Unsupported(f"architecture {arch}")
    if kind == "gpt2":
        return "gpt2"
    if kind == "llama" and arch in ("gemma3", "llama"):
        return "gemma" if arch == "gemma3" else "llama"
    raise _Unsupported(f"tokenizer {kind} on {arch}")


def covers(meta: dict) -> bool:
    """Whether a GGUF's tokenizer model and architecture are of the kinds written here (from its
    scalar metadata; the vocabulary itself may still turn out unsupported)."""
    try:
        _builder(meta)
        return True
    except _Unsupported:
        return False


def _plan(meta: dict) -> dict:
    """Everything the three files hold, the model's vocabulary and merges as arrays."""
    if "tokenizer.ggml.tokens" not in meta:
        raise _Unsupported("no vocabulary")
    builder = _builder(meta)
    final, kind = FINAL_CLASS[meta["general.architecture"]], meta["tokenizer.ggml.model"]
    tokens, respelled, vocab = _spelling(meta, builder)
    V = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    types = np.zeros(V, np.int64) if types is None else np.asarray(types)
    if types.shape != (V,) or types.dtype.kind not in "iu":
        raise _Unsupported("token types")
    if "tokenizer.ggml.merges" in meta:
        left, right = _file_merges(meta["tokenizer.ggml.merges"], vocab)
    elif builder == "gpt2":
        raise _Unsupported("byte-level without merges")
    else:
        if builder == "gemma":  # Gemma's merges follow the tokens' order, not their scores
            scores = -np.arange(V, dtype=np.float64)
        else:
            scores = meta.get("tokenizer.ggml.scores")
            scores = None if scores is None else np.asarray(scores, np.float64)
            if scores is None or scores.shape != (V,) or not np.isfinite(scores).all():
                raise _Unsupported("scores")
        left, right = _generated_merges(tokens, respelled, vocab, scores)

    # added tokens: the builder class's named specials, the file's control and user-defined tokens,
    # then the architecture class's named specials
    added = _AddedTokens(vocab, V)
    defaults = BUILDER_SPECIALS[builder]
    for tok in dict.fromkeys(defaults[n] for n in SPECIALS if n in defaults):
        added.add(tok, special=True)
    alphabet = frozenset(byte_chars()) if builder == "gpt2" else None
    control = np.flatnonzero(types == CONTROL)
    for i in control.tolist():
        if alphabet is None or alphabet.issuperset(tokens[i]):  # else a mislabel in a byte-level file
            added.add(tokens[i], special=True, normalized=False)
    for i in np.flatnonzero(types == USER_DEFINED).tolist():
        if added.id_of(tokens[i]) is not None:
            added.add(tokens[i], special=False, normalized=False)
    specials = {}
    for name, key in GGUF_SPECIAL_IDS.items():
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None:
            if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or not 0 <= tid < V:
                raise _Unsupported(name)
            specials[name] = tokens[int(tid)]
        else:
            specials[name] = None
    if final == "GemmaTokenizer":
        specials["mask_token"] = "<mask>"
    named = [specials.get(n) for n in SPECIALS if specials.get(n) is not None]
    for tok in named:
        if tok not in added.table:
            added.add(tok, special=True)
    if final == "Qwen2Tokenizer":  # re-adds its special tokens as special
        for tok in dict.fromkeys(named):
            added.add(tok, special=True)

    pipeline = PIPELINES[builder]
    pre = pipeline["pre_tokenizer"]
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            dict(_BYTE_LEVEL, use_regex=False)]}
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise; no flag at all
    # keeps the builder's template, which is the one of two false flags
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = specials["bos_token"], specials["eos_token"]
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    for flag, tok in ((add_bos, bos), (add_eos, eos)):
        if flag and (not tok or any(c.isspace() for c in tok)):  # the template string would not parse
            raise _Unsupported("a special token the template cannot name")
    post = _template(bos, added.id_of(bos) if add_bos else None, eos, added.id_of(eos) if add_eos else None,
                     add_bos, add_eos)

    config = {"backend": "tokenizers", "is_local": True, "local_files_only": False,
              "model_max_length": VERY_LARGE_INTEGER, "tokenizer_class": final, **specials}
    if final == "Qwen2Tokenizer":
        config["add_prefix_space"] = None
    template = meta.get("tokenizer.chat_template")
    return {"tokens": tokens, "respelled": respelled, "left": left, "right": right, "added": added.json(),
            "normalizer": pipeline["normalizer"], "pre_tokenizer": pre, "post_processor": post,
            "decoder": pipeline["decoder"], "model": pipeline["model"], "config": config,
            "chat_template": template if isinstance(template, str) else None}


def _write_tokenizer_json(plan: dict, path: Path) -> None:
    """tokenizer.json, the vocabulary and merges streamed from the token list and id arrays."""
    def dump(v) -> str:
        return json.dumps(v, ensure_ascii=False)

    tokens, respelled = plan["tokens"], plan["respelled"]
    spelled = [dump(respelled.get(i, t)) for i, t in enumerate(tokens)]  # each token as JSON, once
    head = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": plan["added"]}
    for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        head[k] = plan[k]
    model = {"type": "BPE", "dropout": None, **plan["model"], "ignore_merges": False}
    with open(path, "w", encoding="utf-8") as f:
        f.write(dump(head)[:-1] + ', "model": ' + dump(model)[:-1] + ', "vocab": {')
        step = 1 << 14
        for s in range(0, len(spelled), step):
            f.write(", ".join(f"{spelled[i]}: {i}" for i in range(s, min(s + step, len(spelled)))))
            if s + step < len(spelled):
                f.write(", ")
        f.write('}, "merges": [')
        left, right = plan["left"], plan["right"]
        for s in range(0, left.size, step):
            pairs = zip(left[s:s + step].tolist(), right[s:s + step].tolist())
            f.write(", ".join(f"[{spelled[a]}, {spelled[b]}]" for a, b in pairs))
            if s + step < left.size:
                f.write(", ")
        f.write("]}}\n")


def write_gguf_tokenizer(meta: dict, directory: Path) -> bool:
    """Write tokenizer.json, tokenizer_config.json and (when the file has one) chat_template.jinja
    of a GGUF's tokenizer into `directory`, as transformers' converter saves them, from `meta` (the
    GGUF's metadata: key -> value, arrays as lists or numpy arrays). False, writing nothing, for a
    tokenizer not covered (see the module docstring)."""
    from dipstream.io import atomic_path

    try:
        plan = _plan(meta)
    except _Unsupported:
        return False
    directory = Path(directory)
    try:
        with atomic_path(directory / "tokenizer.json") as tmp:
            _write_tokenizer_json(plan, tmp)
    except UnicodeEncodeError:  # a token that is no valid text
        return False
    with atomic_path(directory / "tokenizer_config.json") as tmp:
        text = json.dumps(plan["config"], indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        tmp.write_text(text, encoding="utf-8")
    if plan["chat_template"] is not None:
        with atomic_path(directory / "chat_template.jinja") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(plan["chat_template"])
    return True
