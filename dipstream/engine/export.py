"""Export: a Hugging Face checkpoint (a built-in model's converted cache, or a local folder), with
LoRA adapters merged in where given, into the engine's model file (`dipstream export`, and
`generate` on first use).

The architecture comes from the checkpoint's config through the one reader of configs
(`ModelShape.from_hf_config`) and the family table (`models.families`); the RoPE tables are the
ones the family's own transformers module computes (default, linear, llama3, yarn, and longrope
or dynamic up to their original length), so the engine rotates exactly as the model does.
Tensors are read one at a time from the safetensors files (no copy of the whole model in RAM).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipstream.engine.modelfile import (
    DATA,
    FORMAT,
    KEEP,
    MANIFEST,
    default_head,
    read_manifest,
    write_model_file,
)
from dipstream.engine.qmatrix import QUANTIZE
from dipstream.engine.text import LEAN_FILE
from dipstream.errors import DipstreamError
from dipstream.io import folder_lock
from dipstream.models.builtins import BUILTIN_MODELS, gguf_of, is_gguf
from dipstream.models.families import (
    ARCHITECTURES,
    activation_name,
    arch_spec,
    decoder_spec,
    model_type_of,
    text_config,
)
from dipstream.names import layer_key
from dipstream.native import ACTIVATION_CODES
from dipstream.paths import cache_root
from dipstream.simulator.model_shape import ModelShape
from dipstream.validation import input_dir, output_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "config.json")  # copied beside the model file
EXPORT_FILES = (DATA, MANIFEST, LEAN_FILE, *TOKENIZER_FILES)  # what an export writes in its folder


@dataclass
class ModelFileOptions:
    """The engine's model file of a run: its formats, its folder, the adapters merged into it."""

    weights: str | None = field(default=None, metadata={
        "help": "format of the weight matrices of the engine's model file: gguf (a GGUF's own blocks, moved without "
                "re-quantizing: the default for a GGUF or built-in model), int4 (Q4_1-like groups of 32: the default for "
                "a Hugging Face folder, its head int8), int8 (Q8_0-like) or float32 (exact: the default where LoRA "
                "adapters are merged)",
        "choices": (KEEP,) + QUANTIZE})
    head_weights: str | None = field(default=None, metadata={
        "help": "format of the embedding / output head (default: --weights; int8 with int4, as GGUF Q4 files keep it "
                "in Q8_0)", "choices": (KEEP,) + QUANTIZE})
    model_dir: str | None = field(default=None, metadata={
        "help": "folder of the exported model file (default: in dipstream's cache, where `generate` looks; written "
                "on first use)", "metavar": "DIR"})
    adapter: str | None = field(default=None, metadata={
        "help": "merge the LoRA adapters of this `dipstream finetune` folder into the exported weights (peft's "
                "merge: exact for DIP's column masks, which feed an adapter the same inputs as its weight)",
        "metavar": "DIR"})

    def validate(self) -> None:
        """The folders, before anything is loaded."""
        output_dir("model_dir", self.model_dir)
        input_dir("adapter", self.adapter, "finetune --out folder")


@dataclass
class ExportConfig:
    """Export a model into the engine's model file."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "built-in model name (see `dipstream models`), a GGUF file (PATH.gguf) or a local HF checkpoint "
                "folder"})
    file: ModelFileOptions = field(default_factory=ModelFileOptions)
    memory: str | None = field(default=None, metadata={
        "help": "refuse to start unless the export's estimated peak memory fits this (e.g. 150MB): a GGUF of a "
                "family the light readers map is exported with neither torch nor transformers (SmolLM2: about "
                "95 MB)", "metavar": "SIZE"})


# ------------------------------------------------------------------------------------ architecture

def _rope_tables(config) -> tuple[dict, dict]:
    """({table name: {inv_freq, scale, limit}}, {layer type: table name}) from the family's own
    rotary embedding module (its inverse frequencies and attention scaling, as transformers computes
    them); `limit`: the length up to which the tables hold (longrope and dynamic RoPE change
    beyond their original length), else None."""
    import torch  # noqa: F401 - the rotary module computes in torch

    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    rotary = next(c for n, c in vars(module).items() if n.endswith("RotaryEmbedding") and isinstance(c, type))
    rot = rotary(config)
    params = getattr(config, "rope_parameters", None) or {}
    kinds = getattr(rot, "layer_types", None)
    tables, by_type = {}, {}
    for kind in (kinds or [None]):
        p = params.get(kind, params) if kind else params
        rtype = (p.get("rope_type") if isinstance(p, dict) else None) or "default"
        limit = None
        if rtype == "longrope":
            limit = int(p.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings"))
        elif rtype == "dynamic":
            limit = int(getattr(rot, "original_max_seq_len", config.max_position_embeddings))
        prefix = f"{kind}_" if kind else ""
        inv = getattr(rot, f"{prefix}inv_freq").detach().float().cpu().numpy()
        scale = getattr(rot, f"{prefix}attention_scaling")
        name = kind or "default"
        tables[name] = {"inv_freq": [float(v) for v in inv], "scale": float(scale), "limit": limit, "type": rtype}
        by_type[kind] = name
    return tables, by_type


def engine_arch(config) -> dict:
    """The manifest's architecture of a transformers config (one-line errors for what the engine
    does not run)."""
    dec = decoder_spec(config)
    cfg = text_config(config)
    shape = ModelShape.from_hf_config(config)
    act = activation_name(config)
    if act not in ACTIVATION_CODES:
        raise DipstreamError(f"the engine's kernels have no activation '{act}' (they run {', '.join(ACTIVATION_CODES)})")
    L = shape.n_layers
    window = int(getattr(cfg, "sliding_window", None) or 0) if getattr(cfg, "use_sliding_window", True) else 0
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window and dec.window_all_layers else "full_attention"] * L
    tables, by_type = _rope_tables(cfg)
    no_rope = getattr(cfg, "no_rope_layers", None)  # SmolLM3: 1 where a layer rotates, 0 where it does not
    layers = [{"window": window if types[i] == "sliding_attention" else 0,
               "rope": None if no_rope is not None and not no_rope[i] else by_type.get(types[i], by_type.get(None))}
              for i in range(L)]
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    eos = getattr(cfg, "eos_token_id", getattr(config, "eos_token_id", None))
    return {"model_type": model_type_of(config),
            "shape": shape.to_dict(), "eps": float(getattr(cfg, "rms_norm_eps", 1e-6)), "act": act,
            "query_scale": float(scalar if scalar else shape.head_dim) ** -0.5,
            "attn_softcap": getattr(cfg, "attn_logit_softcapping", None),
            "final_softcap": getattr(cfg, "final_logit_softcapping", None),
            "layers": layers, "rope": tables, "max_positions": int(getattr(cfg, "max_position_embeddings", 2048)),
            "bos": getattr(cfg, "bos_token_id", getattr(config, "bos_token_id", None)), "eos": eos}


# ------------------------------------------------------------------------------------ tensors

def _checkpoint_source(ckpt: Path):
    """get(name) -> float32 array of a tensor of the checkpoint's safetensors, and has(name)."""
    from safetensors import safe_open

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise DipstreamError(f"{ckpt} has no .safetensors weights")
    handles = [safe_open(str(f), framework="numpy") for f in files]
    index = {k: h for h in handles for k in h.keys()}

    def get(name):
        if name not in index:
            raise DipstreamError(f"{ckpt} lacks tensor {name}")
        return index[name].get_tensor(name).astype(np.float32)

    return get, index.__contains__


def _merged_source(model):
    """get / has over the state of a loaded model whose LoRA adapters are merged here (peft's merge)."""
    import torch

    from dipstream.models.adapters import merge_lora

    merge_lora(model)
    state = dict(model.state_dict())

    def get(name):
        if name not in state:
            raise DipstreamError(f"the merged model lacks tensor {name}")
        return state[name].detach().to(torch.float32).numpy()

    return get, state.__contains__


def model_tensors(config, arch: dict, get, has, static_fmt: str, mlp_fmt: str, head_fmt: str):
    """(name, rows by input (rows x m float32), format) of every tensor of the model file, one at a
    time: attention projections and the MLP's bundled records transposed to records by input."""
    spec, dec = arch_spec(config), decoder_spec(config)
    s = ModelShape.from_dict(arch["shape"])
    H, Hkv, hd = s.n_heads, s.n_kv_heads, s.head_dim
    E = get("model.embed_tokens.weight")  # (V, d)
    if s.tied_embeddings:
        yield "head", np.ascontiguousarray(E.T), head_fmt  # d records of V outputs; a lookup reads a column
    else:
        yield "embed", E, head_fmt  # V records of d: a lookup reads one record
        yield "head", np.ascontiguousarray(get("lm_head.weight").T), head_fmt
    del E
    yield "final_norm", get("model.norm.weight")[None], "float32"
    for i in range(s.n_layers):
        p, a = f"{spec.layers}.{i}.", f"{spec.layers}.{i}.{spec.attn}."
        if dec.qkv:  # fused [q; k; v] rows
            sizes = np.cumsum([H * hd, Hkv * hd])
            w = np.split(get(a + dec.qkv + ".weight"), sizes)
            b = np.split(get(a + dec.qkv + ".bias"), sizes) if has(a + dec.qkv + ".bias") else None
            qkv = {"q": (w[0], b and b[0]), "k": (w[1], b and b[1]), "v": (w[2], b and b[2])}
        else:
            qkv = {k: (get(a + n + ".weight"), get(a + n + ".bias") if has(a + n + ".bias") else None)
                   for k, n in zip("qkv", spec.attn_proj[:3])}
        for key, (w, bias) in qkv.items():
            yield layer_key(i, key), np.ascontiguousarray(w.T), static_fmt
            if bias is not None:
                yield layer_key(i, f"{key}_bias"), bias[None], "float32"
        yield layer_key(i, "o"), np.ascontiguousarray(get(a + spec.attn_proj[-1] + ".weight").T), static_fmt
        for key, name in (("attn_norm", dec.attn_norm), ("mlp_norm", dec.mlp_norm),
                          ("post_attn_norm", dec.post_attn_norm), ("post_mlp_norm", dec.post_mlp_norm)):
            if name:
                yield layer_key(i, key), get(p + name + ".weight")[None], "float32"
        for key in ("q_norm", "k_norm"):
            if has(a + key + ".weight"):
                yield layer_key(i, key), get(a + key + ".weight")[None], "float32"
        m = p + spec.mlp + "."
        if spec.fused_gate_up:
            gate_up = get(m + spec.fused_gate_up + ".weight").T  # (d, 2D): gate rows first, as [gate | up]
        else:
            gate_up = np.concatenate([get(m + spec.gate + ".weight").T, get(m + spec.up + ".weight").T], axis=1)
        yield layer_key(i, "mlp_in"), np.ascontiguousarray(gate_up), mlp_fmt
        del gate_up
        yield layer_key(i, "mlp_out"), np.ascontiguousarray(get(m + spec.down + ".weight").T), mlp_fmt


def _check_biases(config, has) -> None:
    spec = arch_spec(config)
    for i in range(text_config(config).num_hidden_layers):
        m = f"{spec.layers}.{i}.{spec.mlp}."
        if any(has(m + n + ".bias") for n in (spec.gate, spec.up, spec.down, spec.fused_gate_up) if n):
            raise DipstreamError("the engine runs bias-free MLP projections; this checkpoint's MLP has biases")


def export_checkpoint(ckpt: str | Path, directory: str | Path, model: str, weights: str = "float32",
                      head: str | None = None, adapter: str | Path | None = None) -> dict:
    """Write the model file of a HF checkpoint folder (LoRA adapters of `adapter` merged in) into
    `directory`. Returns the manifest."""
    from transformers import AutoConfig

    head = head or default_head(weights)
    for f in (weights, head):
        if f not in QUANTIZE:
            raise DipstreamError(f"a Hugging Face checkpoint is stored in {', '.join(QUANTIZE)}, not '{f}' "
                                 f"({KEEP} keeps a GGUF's blocks: give the .gguf file)")
    ckpt, directory = Path(ckpt), Path(directory)
    config = AutoConfig.from_pretrained(ckpt)
    arch = engine_arch(config)
    lora_weights = 0
    if adapter is None:
        get, has = _checkpoint_source(ckpt)
    else:
        from types import SimpleNamespace

        import torch
        from transformers import AutoModelForCausalLM

        from dipstream.models.adapter_folder import inject_lora
        from dipstream.models.arch import describe

        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        _, lora_weights = inject_lora(SimpleNamespace(model=hf, info=describe(hf)), adapter)
        get, has = _merged_source(hf)
    _check_biases(config, has)
    meta = {"model": model, "arch": arch, "static_fmt": weights, "mlp_fmt": weights, "head_fmt": head,
            "adapter": adapter_id(adapter), "adapter_weights": lora_weights}
    manifest = write_model_file(directory, meta, model_tensors(config, arch, get, has, weights, weights, head))
    from dipstream.engine.text import write_lean_tokenizer

    for name in TOKENIZER_FILES:
        if (ckpt / name).exists():
            (directory / name).write_bytes((ckpt / name).read_bytes())
    write_lean_tokenizer(directory)
    return manifest


def export_gguf(path: str | Path, directory: str | Path, model: str, weights: str = KEEP,
                head: str | None = None) -> dict:
    """Write the model file of a GGUF into `directory`: its blocks moved into records (weights
    gguf) or re-quantized (float32, int8, int4), a slice of one tensor at a time. Returns the
    manifest."""
    from dipstream.devices import map_large_allocations, release_memory
    from dipstream.engine.gguf_arch import Unsupported
    from dipstream.engine.gguf_source import GGUFSource
    from dipstream.engine.text import write_lean_tokenizer

    map_large_allocations()
    head = head or default_head(weights)
    src = GGUFSource(path)
    try:
        arch = src.engine_arch()
    except Unsupported:  # a configuration only transformers' GGUF reader maps
        arch = engine_arch(src.transformers_config())
    directory = Path(directory)
    keep = (lambda f: None if f == KEEP else f)
    meta = {"model": model, "arch": arch, "static_fmt": weights, "mlp_fmt": weights, "head_fmt": head,
            "adapter": None, "adapter_weights": 0, "source": {"gguf": src.path.name, "bytes": src.path.stat().st_size}}
    directory.mkdir(parents=True, exist_ok=True)
    src.write_tokenizer(directory)  # first: its peak (`tokenizers` checking the lean one) meets the smaller heap
    release_memory()
    write_lean_tokenizer(directory)
    release_memory()
    manifest = write_model_file(directory, meta, src.tensors_of(arch, keep(weights), keep(head)))
    src.file.close()
    return manifest


def source_weights(model: str, weights: str | None, adapter: str | None = None) -> str:
    """--weights as given, or the default of the model's source: gguf for a GGUF (its own blocks),
    int4 for a Hugging Face folder (a 4-bit file, as a GGUF user gets; its head int8), float32 where
    LoRA adapters are merged (they merge into float weights)."""
    if weights is not None:
        return weights
    if adapter is not None:
        return "float32"
    return KEEP if is_gguf(model) or model in BUILTIN_MODELS else "int4"


def adapter_id(adapter: str | Path | None) -> str | None:
    """sha256 (16 hex digits) of an adapter folder's LoRA files: which adapters a file has merged."""
    if adapter is None:
        return None
    from dipstream.models.adapters import LORA_FILES

    h = hashlib.sha256()
    for name in LORA_FILES:
        path = Path(adapter).expanduser() / name
        if not path.is_file():
            raise DipstreamError(f"adapter '{adapter}' has no {name}: the engine merges LoRA adapters; give the --out "
                                 "folder of a `dipstream finetune` run that trained LoRA adapters")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ the cache

def default_model_dir(model: str, weights: str, head: str, adapter: str | None = None) -> Path:
    """The cache folder of a model's file: by name (built-ins, folders), a GGUF path also by its place
    (two files called model.gguf in different folders get their own)."""
    suffix = f"-lora-{adapter_id(adapter)}" if adapter else ""
    name = Path(model).name
    if is_gguf(model):
        name = f"{Path(model).stem}-{hashlib.sha256(str(Path(model).expanduser().resolve()).encode()).hexdigest()[:8]}"
    return cache_root() / "engine" / f"{name}-{weights}-{head}-{FORMAT.split('/')[-1]}{suffix}"


def ensure_model_file(model: str, weights: str | None, head: str | None = None, directory: str | None = None,
                      adapter: str | None = None, memory: int | None = None, run: bool = True) -> Path:
    """The exported model file of `model` (built-in name, GGUF file or HF folder) in these formats
    (None: the source's own, `source_weights`), with these adapters, written once under a lock
    (exporting loads the Hugging Face stack; reusing the file does not). A folder holding another
    model, formats or adapters is refused. `memory`: a run's --memory; an export that would not fit
    it is refused before it starts, naming the command to run first (`run`: the budget is a run's,
    else the export's own)."""
    weights = source_weights(model, weights, adapter)
    head = head or default_head(weights)
    d = Path(directory) if directory else default_model_dir(model, weights, head, adapter)
    if not (d / MANIFEST).exists():
        _refuse_foreign_folder(d)
        gguf = gguf_of(model)
        if (KEEP in (weights, head)) and (gguf is None or adapter is not None):
            raise DipstreamError(f"--weights {KEEP} keeps a GGUF's own blocks: give a .gguf file or a built-in model, "
                                 "without --adapter (adapters merge into float32, int8 or int4 weights)")
        _export_fits(model, weights, d, gguf if adapter is None else None, memory, run)
        with folder_lock(d, "model export", wait=True):
            if not (d / MANIFEST).exists():
                from dipstream.io import clean_temps

                clean_temps(d, EXPORT_FILES)  # a killed export's temporaries
                if gguf is not None and adapter is None:
                    export_gguf(gguf, d, Path(model).name, weights, head)
                else:
                    from dipstream.models.loading import resolve_checkpoint

                    name, ckpt = resolve_checkpoint(model)
                    export_checkpoint(ckpt, d, name, weights, head, adapter)
                from dipstream.devices import release_memory

                release_memory()  # the export's freed heap back to the system before a run measures its baseline
    m = read_manifest(d)
    want = (weights, weights, head, adapter_id(adapter))
    have = (m["mlp_fmt"], m["static_fmt"], m["head_fmt"], m.get("adapter"))
    if have != want:
        raise DipstreamError(f"{d} holds {have[0]} / {have[2]} weights{' with adapters ' + have[3] if have[3] else ''}, "
                             f"not {weights} / {head}{' with adapters ' + want[3] if want[3] else ''}; use another "
                             "--model-dir")
    if m["model"] != Path(model).name and m["model"] != model:
        raise DipstreamError(f"{d} holds model '{m['model']}', not '{model}'; use another --model-dir")
    gguf = Path(model).expanduser() if is_gguf(model) and m.get("source") else None  # a user's GGUF, still there
    if gguf is not None and gguf.is_file() and m["source"].get("bytes") != gguf.stat().st_size:
        raise DipstreamError(f"{d} was exported from another {gguf.name} ({m['source'].get('bytes')} bytes, this one "
                             f"{gguf.stat().st_size}); use another --model-dir")
    return d


def _refuse_foreign_folder(d: Path) -> None:
    """An export writes only into a new folder, an empty one or one of its own (an interrupted
    export's files): a folder holding anything else is refused in one line, nothing written."""
    if not d.is_dir():
        return
    own = {*EXPORT_FILES, ".lock"}
    foreign = sorted(p.name for p in d.iterdir()
                     if p.name not in own and not any(p.name.startswith(f".{n}.") for n in own))
    if foreign:
        raise DipstreamError(f"{d} holds no model file but other files ({', '.join(foreign[:3])}); give a new or "
                             "empty folder for the export")


def _export_fits(model: str, weights: str, d: Path, gguf: Path | None, memory: int | None, run: bool) -> None:
    """Refuse (one line, before anything grows) a --memory below what exporting `d` is estimated
    to take (`export_memory`), saying where to export it instead; `run`: the budget is a run's."""
    if memory is None:
        return
    if gguf is not None:
        from dipstream.engine.gguf_source import export_memory

        need = export_memory(gguf, requant=weights != KEEP)
    else:
        need = 1 << 30  # a Hugging Face folder: transformers, torch and one float32 tensor at a time
    if memory < need:
        from dipstream.simulator.hardware import fmt_bytes

        command = f"`dipstream export --model {model} --model-dir {d} --weights {weights}`"
        where = (f"export it once where that much is free ({command}; the folder can be copied), then run this command"
                 if run else f"give --memory {fmt_bytes(need, round_up=True).replace(' ', '')} or more, or run "
                 f"{command} on a machine with that much free and copy the folder")
        raise DipstreamError(f"{d} has no model file yet, and exporting it takes about {fmt_bytes(need)}, more than "
                             f"--memory {fmt_bytes(memory)}: {where}")


def run_export(cfg: ExportConfig) -> dict:
    """Write (or find) the model file; returns {model_dir, bytes, formats, seconds, peak RSS}."""
    import time

    from dipstream.devices import peak_rss_bytes

    from dipstream.simulator.hardware import parse_bytes

    f = cfg.file
    f.validate()
    try:
        memory = None if cfg.memory is None else int(parse_bytes(cfg.memory))
    except ValueError as exc:
        raise DipstreamError(f"--memory: {exc}") from None
    start = time.perf_counter()
    d = ensure_model_file(cfg.model, f.weights, f.head_weights, f.model_dir, f.adapter, memory, run=False)
    m = read_manifest(d)
    return {"model_dir": str(d), "bytes": int(m["size"]), "weights": m["mlp_fmt"], "head_weights": m["head_fmt"],
            "family": m["arch"]["model_type"], "adapter": m.get("adapter"), "seconds": time.perf_counter() - start,
            "peak_rss_bytes": peak_rss_bytes()}


def engine_runs(model: str, model_dir: str | Path) -> tuple[str | None, bool]:
    """(model_type, whether the engine runs it) of a model: from its model file in `model_dir` when
    there is one, else from the checkpoint's config.json (no heavy imports either way)."""
    if (Path(model_dir) / MANIFEST).exists():
        return json.loads((Path(model_dir) / MANIFEST).read_text())["arch"]["model_type"], True
    gguf = gguf_of(model)
    if gguf is not None:
        from dipstream.engine.gguf_source import gguf_architecture

        return gguf_architecture(gguf), True  # one-line refusal of the architectures the export does not read
    from types import SimpleNamespace

    from dipstream.models.loading import resolve_checkpoint

    config = json.loads((resolve_checkpoint(model)[1] / "config.json").read_text())
    text = config.get("text_config")
    model_type = model_type_of(SimpleNamespace(model_type=config.get("model_type"), text_config=text))
    spec = ARCHITECTURES.get(model_type)
    return model_type, spec is not None and spec.decoder is not None
