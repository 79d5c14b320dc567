"""Load built-in models (GGUF from registry packages, converted once to a float safetensors cache)
or any local Hugging Face checkpoint directory with a gated MLP."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dipstream.errors import DipstreamError
from dipstream.models.arch import ModelInfo, check_supported, describe
from dipstream.models.builtins import BUILTIN_MODELS, BuiltinModel, is_gguf  # noqa: F401 - re-exported
from dipstream.paths import cache_root
from dipstream.simulator.model_shape import SHAPES, ModelShape

log = logging.getLogger(__name__)




@dataclass
class LoadedModel:
    """A CausalLM in eval mode with its tokenizer and shape summary."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    device: str = "cpu"
    load_seconds: float = 0.0
    load_peak_bytes: int = 0  # the process's peak memory after loading (GPU: allocated)


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


CACHE_MARKER = "dipstream_cache.json"  # written last: each file's size, sha256 and mtime of a finished conversion


def _file_record(path: Path) -> dict:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    st = path.stat()
    return {"size": st.st_size, "sha256": h.hexdigest(), "mtime_ns": st.st_mtime_ns}


def write_cache_marker(folder: Path, model: str) -> None:
    """Record a finished conversion in `folder`: each file's size, content hash and mtime."""
    import json

    files = {p.name: _file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_MARKER}
    (folder / CACHE_MARKER).write_text(json.dumps({"model": model, "files": files}))


def _recorded(target: Path) -> dict | None:
    import json

    try:
        files = json.loads((target / CACHE_MARKER).read_text())["files"]
        return files if isinstance(files, dict) and files else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_complete(target: Path) -> bool:
    """Whether `target` holds a finished conversion whose files all have their recorded sizes
    (cheap: for listings; a run checks `cache_intact`)."""
    files = _recorded(target)
    try:
        return files is not None and all((target / name).stat().st_size == (r["size"] if isinstance(r, dict) else r)
                                         for name, r in files.items())
    except (OSError, TypeError, KeyError):
        return False


def cache_intact(target: Path) -> bool:
    """Whether `target`'s files are the ones its conversion recorded: sizes, and the content hash
    of every file whose mtime changed since (same-size damage, an edited config). A cache recorded
    with sizes only (before hashes were kept) gets its hashes recorded now, once."""
    files = _recorded(target)
    if files is None or not cache_complete(target):
        return False
    if not all(isinstance(r, dict) for r in files.values()):
        import json

        model = json.loads((target / CACHE_MARKER).read_text()).get("model", target.name)
        write_cache_marker(target, model)
        return True
    try:
        for name, r in files.items():
            path = target / name
            if path.stat().st_mtime_ns != r.get("mtime_ns") and _file_record(path)["sha256"] != r.get("sha256"):
                return False
    except (OSError, TypeError, AttributeError):
        return False
    return True


def _convert_builtin(builtin: BuiltinModel, target: Path) -> None:
    """Dequantize the GGUF once into float32 safetensors + tokenizer files under `target`."""

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = builtin.gguf()
    log.warning("converting %s from %s (one time) into %s", builtin.name, gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in src.config.to_dict().items()
                                     if k != "quantization_config"})
    with torch.device("meta"):  # no second float32 copy: the fresh model takes src's tensors
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False, assign=True)
    fresh.tie_weights()
    missing = [k for k in missing if "lm_head" not in k]  # tied heads are rebuilt from embeddings
    if missing or unexpected:
        raise DipstreamError(f"converting {builtin.name} failed: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{builtin.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_cache_marker(tmp, builtin.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_model(path: Path) -> BuiltinModel:
    """A user's GGUF file as a model to convert once (keyed by its path, size and mtime)."""
    import hashlib

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return BuiltinModel(f"{path.stem}-{key}", lambda: path, f"GGUF file {path}")


def _ensure_converted(name: str, force: bool = False, model: BuiltinModel | None = None) -> Path:
    """The converted cache of built-in model `name` (or of `model`, a user's GGUF), converting it
    (again, with `force`) under a lock, so concurrent runs convert once and a killed conversion's
    leftovers are removed."""
    from dipstream.io import folder_lock
    from dipstream.validation import private_dir

    models = cache_root() / "models"
    target = models / name
    if not force and cache_intact(target):
        return target
    if name in SHAPES:  # measured: converting qwen2.5-coder-1.5b peaks at 9.1 GB, 1.28x its float32 weights
        from dipstream.devices import available_bytes, check_memory, model_bytes

        check_memory(int(1.3 * model_bytes(SHAPES[name], "float32")), available_bytes(torch.device("cpu")),
                     f"converting {name} to float32 (once)", f"free memory, or convert it on a bigger machine "
                     f"and copy its folder to {target}")
    try:
        private_dir(models)
        with folder_lock(models, "model conversion", wait=True):
            for stale in models.glob(f".{name}-*"):  # a conversion killed half-way
                shutil.rmtree(stale, ignore_errors=True)
            if force or not cache_intact(target):
                _quiet_transformers()
                _convert_builtin(model or BUILTIN_MODELS[name], target)
    except OSError as exc:
        raise DipstreamError(f"the model cache {models} is not writable ({exc.strerror}); make it "
                             "writable or set DIPSTREAM_CACHE to a folder of your own") from None
    return target


def shape_of(name_or_path: str) -> ModelShape:
    """The shape of a model by name: a simulator preset (e.g. llama3-8b), a built-in model, or a
    local checkpoint folder, read from its config without loading weights."""
    from transformers import AutoConfig

    if name_or_path in SHAPES:
        return SHAPES[name_or_path]
    config = AutoConfig.from_pretrained(resolve_checkpoint(name_or_path)[1])
    check_supported(config)
    return ModelShape.from_hf_config(config)


def is_moe_checkpoint(name_or_path: str) -> bool:
    """Whether a model is a mixture-of-experts one, from its config alone (no weights, no code);
    the built-in models are not."""
    if name_or_path in BUILTIN_MODELS:
        return False
    from transformers import AutoConfig

    from dipstream.models.moe import is_moe

    path = Path(str(name_or_path)).expanduser()
    if not (path / "config.json").is_file():
        return False  # resolve_checkpoint says what is wrong with it
    try:
        return is_moe(AutoConfig.from_pretrained(path))
    except DipstreamError:
        raise
    except Exception:  # noqa: BLE001 - a damaged config: load_model gives the error
        return False


def refuse_moe(name_or_path: str, command: str) -> None:
    """One-line refusal, before anything is loaded, of a mixture-of-experts model in a command
    that runs dense-MLP models only."""
    if is_moe_checkpoint(name_or_path):
        raise DipstreamError(f"`dipstream {command}` does not run mixture-of-experts models yet; evaluate and "
                             f"simulate {name_or_path} with `dipstream eval` / `simulate` / `sweep`")


def resolve_checkpoint(name_or_path: str) -> tuple[str, Path]:
    """Map a built-in name or local directory to (display name, checkpoint directory)."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path, _ensure_converted(name_or_path)
    path = Path(name_or_path).expanduser()
    if is_gguf(name_or_path):  # converted once to float32 safetensors (dequantized by gguf)
        if not path.is_file():
            raise DipstreamError(f"GGUF file '{path}' does not exist; give the path of a .gguf model file")
        model = _gguf_model(path)
        return path.name, _ensure_converted(model.name, model=model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DipstreamError(f"'{path}' has no config.json; give a Hugging Face checkpoint folder")
        return path.name, path
    raise DipstreamError(f"unknown model '{name_or_path}': use one of {', '.join(BUILTIN_MODELS)}, "
                         f"a GGUF file (PATH.gguf) or a local Hugging Face checkpoint folder")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a built-in model by name or a local checkpoint directory straight into `dtype` on
    `device` (float32 on CPU by default). The weights' footprint, predicted from the config, is
    checked against the device's free memory before anything is loaded."""
    import time

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dipstream.devices import available_bytes, check_dtype, check_memory, model_bytes, peak_memory, pick_device

    dev = pick_device(device) if isinstance(device, str) else device
    dtype_name = str(dtype).removeprefix("torch.")
    check_dtype(dev, dtype_name)
    _quiet_transformers()
    name, ckpt = resolve_checkpoint(name_or_path)
    start = time.perf_counter()

    def load(ckpt):
        config = AutoConfig.from_pretrained(ckpt)
        check_supported(config)  # refuse non-gated architectures and unsupported MoE variants before any weight
        need = model_bytes(ModelShape.from_hf_config(config), dtype_name)
        check_memory(need, available_bytes(dev), f"loading {name} in {dtype_name} on {dev}",
                     "use a smaller --dtype (bfloat16 halves float32), another --device or a smaller model")
        # tensor by tensor into `dtype` (measured: a bfloat16 load peaks at the bfloat16 model plus
        # one tensor, tests/test_scale.py), straight onto a GPU with device_map
        placement = {"device_map": str(dev)} if dev.type != "cpu" else {}
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, **placement)

    try:
        model = load(ckpt)
    except DipstreamError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: any library error
        if name_or_path not in BUILTIN_MODELS:
            raise DipstreamError(f"cannot load the checkpoint in '{ckpt}' ({type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ''}); "
                                 "is it a complete Hugging Face checkpoint folder?") from None
        log.warning("the converted cache of %s is damaged (%s); converting it again", name, type(exc).__name__)
        ckpt = _ensure_converted(name_or_path, force=True)
        model = load(ckpt)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, info=describe(model),
                       device=str(dev), load_seconds=time.perf_counter() - start,
                       load_peak_bytes=peak_memory(dev))
