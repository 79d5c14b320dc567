"""`dipstream generate`: its options (`GenerateConfig`) and the run, on the lean engine
(:mod:`dipstream.runtime.engine_generate`), or on the Hugging Face model where the engine does not
go (CUDA, `--engine hf`; :mod:`dipstream.runtime.hf_generate`). This module stays light (no torch)
so an engine run's process holds only what it needs. The methods it runs are the registry's decode
side (`sparsity.decoding.DECODERS`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dipstream.budget import check_density
from dipstream.engine.config import EngineOptions
from dipstream.engine.decode import DecodeOptions
from dipstream.engine.export import ModelFileOptions, default_model_dir, engine_runs, source_weights
from dipstream.engine.modelfile import default_head
from dipstream.errors import DipstreamError, user_errors
from dipstream.options import CacheAwareOptions, DipOptions
from dipstream.simulator.hardware import parse_bytes, parse_dram
from dipstream.simulator.policies import OFFLINE_POLICIES, CacheOptions
from dipstream.sparsity.decoding import DECODERS
from dipstream.validation import at_least, input_file, output_dir, output_file

ENGINES = ("auto", "lean", "hf")


MAX_BYTES = 1e15  # sizes above 1 PB are typing mistakes: refused before they overflow an array's size


@dataclass
class GenerateConfig:
    """One generation run: model, method, decoding, and (with --offload) the RAM and its caches."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "built-in model name (see `dipstream models`) or a local HF checkpoint folder"})
    method: str = field(default="dip", metadata={
        "help": "a method the engine runs: " + ", ".join(DECODERS)
                + " (dip-ca needs --offload: it follows the engine's cache)", "choices": tuple(DECODERS)})
    density: float = field(default=0.5, metadata={
        "help": "fraction of MLP weight bytes a decoded token reads, in (0, 1]"})
    prompt: str = field(default="The three primary colours are", metadata={
        "help": "the text to continue"})
    chat: bool = field(default=False, metadata={
        "help": "wrap the prompt in the tokenizer's chat template (instruct models)"})
    decoding: DecodeOptions = field(default_factory=DecodeOptions)
    file: ModelFileOptions = field(default_factory=ModelFileOptions)
    dip: DipOptions = field(default_factory=DipOptions)
    ca: CacheAwareOptions = field(default_factory=CacheAwareOptions)
    offload: str | None = field(default=None, metadata={
        "help": "keep the MLP weights in the model file in this directory (exported there on first use; it takes "
                "the place of --model-dir) and only what --memory or --dram leaves for them in RAM", "metavar": "DIR"})
    dram: str = field(default="0.7x", metadata={
        "help": "with --offload and no --memory: RAM for the model's weights and KV cache, as `simulate` places "
                "DRAM: bytes ('400MB') or a fraction of the model file's bytes ('0.7x'); attention, embeddings and "
                "the KV cache take it first, the rest holds the MLP caches and read buffers"})
    cache: CacheOptions = field(default_factory=CacheOptions)
    hot_profile: str | None = field(default=None, metadata={
        "help": "with --offload --policy hot (PowerInfer's placement: the units most read on other text pinned "
                "in RAM, the rest streamed): the unit counts, a profile .npz of `dipstream simulate --policy "
                "hot`; without it `dipstream generate` makes one on the corpus's train split",
        "metavar": "PATH"})
    engine: str = field(default="auto", metadata={
        "help": "auto (the lean engine on the CPU; the Hugging Face model on CUDA), lean or hf", "choices": ENGINES})
    run: EngineOptions = field(default_factory=EngineOptions)
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads of the kernels (default: 1 for the lean engine, torch's for the Hugging Face model)"})
    device: str = field(default="auto", metadata={
        "help": "auto (the CPU, or CUDA with --engine hf), cpu or cuda", "choices": ("auto", "cpu", "cuda")})
    stream: bool = field(default=True, metadata={"help": "print the text as it is generated"})
    trace: str | None = field(default=None, metadata={
        "help": "write this run's MLP masks (prompt included) as a simulator trace (.npz)",
        "metavar": "PATH"})
    json: str | None = field(default=None, metadata={
        "help": "write the result as one JSON object to this file", "metavar": "PATH"})

    def validate(self) -> None:
        """Every option, file and output path, before the model is loaded."""
        check_density(self.density)
        if self.method not in DECODERS:
            raise DipstreamError(f"--method {self.method}: generate runs {', '.join(DECODERS)}")
        self.decoding.validate()
        at_least("threads", self.threads, 1, optional=True)
        at_least("io_threads", self.run.io_threads, 1)
        self.dip.validate()
        self.ca.validate()
        with user_errors():
            self.cache.validate()
        if self.cache.policy == "hot":
            if not self.offload:
                raise DipstreamError("policy hot pins units in the RAM of the offloaded MLP: add --offload DIR")
            if self.method != "dip":
                raise DipstreamError(f"policy hot pins the units DIP reads most often; --method {self.method} "
                                     "does not run with it (use --method dip)")
            input_file("hot_profile", self.hot_profile, "unit-frequency profile (.npz)")
            if self.hot_profile:
                self.policy_kwargs()  # the profile checked (model, counts) before any export or load
        elif self.cache.policy in OFFLINE_POLICIES:
            raise DipstreamError(f"policy '{self.cache.policy}' needs the future or the evaluated text's own "
                                 "counts; the engine supports lru, lfu, window, none and hot (from a profile)")
        elif self.hot_profile:
            raise DipstreamError("--hot-profile is for --policy hot")
        if self.offload:
            try:
                dram = parse_dram(self.dram, 1.0)
            except ValueError as exc:
                raise DipstreamError(f"--dram: {exc}") from None
            if dram > (1e3 if str(self.dram).strip().lower().endswith("x") else MAX_BYTES):
                raise DipstreamError(f"--dram {self.dram} is out of range: give at most {MAX_BYTES:.0e} bytes "
                                     "(1 PB) or a fraction of the weights up to 1000x")
        if self.trace and self.method == "dense" and not self.offload:
            raise DipstreamError("--trace records the sparse MLP's masks: a dense run in RAM has none; use "
                                 "--method dip, or --offload DIR for dense streaming's trace")
        if self.method == "dip-ca" and not self.offload:
            raise DipstreamError("dip-ca picks its masks from the engine's RAM cache: run it with "
                                 "--offload DIR --memory BUDGET (or --dram BUDGET)")
        self.file.validate()
        output_file("json", self.json)
        output_file("trace", self.trace)
        output_dir("offload", self.offload)
        for flag, value in (("--memory", self.run.memory), ("--read-gap", self.run.read_gap)):
            try:
                size = None if value is None else parse_bytes(value)
            except ValueError as exc:
                raise DipstreamError(f"{flag}: {exc}") from None
            if size is not None and size > MAX_BYTES:
                raise DipstreamError(f"{flag} {value} is out of range: give at most {MAX_BYTES:.0e} bytes (1 PB)")
        if self.offload and self.file.model_dir and Path(self.offload).expanduser().resolve() != \
                Path(self.file.model_dir).expanduser().resolve():
            raise DipstreamError("--offload DIR is where the model file is read from: give it alone, or the same "
                                 "folder as --model-dir")
        if self.run.memory is not None and not self.offload:
            raise DipstreamError("--memory sizes the caches of an offloaded MLP: add --offload DIR (in RAM the "
                                 "whole model is resident)")

    def validate_hf(self) -> None:
        """What the Hugging Face front end does not do: it runs the model in RAM, in float32 (bfloat16 on CUDA)."""
        if self.offload:
            raise DipstreamError("the Hugging Face engine does not offload: the lean engine runs --offload (drop "
                                 "--engine hf)")
        if self.file.weights not in (None, "float32") or self.file.head_weights not in (None, "float32"):
            raise DipstreamError(f"--weights {self.file.weights}: the Hugging Face engine runs float32 (bfloat16 on CUDA); "
                                 "the lean engine runs the quantized formats (drop --engine hf)")

    def validate_lean(self) -> None:
        """What the lean engine does not do."""
        if self.device == "cuda":
            raise DipstreamError("the lean engine runs on the CPU: drop --device cuda, or use --engine hf")

    def policy_kwargs(self) -> dict:
        """The cache policy's arguments; for hot, the unit counts of --hot-profile."""
        kw = self.cache.policy_kwargs()
        if self.cache.policy == "hot":
            from dipstream.simulator.policies import load_profile

            freq, meta = load_profile(self.hot_profile)
            if meta["model"] != self.model:
                raise DipstreamError(f"--hot-profile {self.hot_profile} was made for model {meta['model']}, not "
                                     f"{self.model}; give that model's profile or leave --hot-profile out")
            kw["frequency"] = freq
        return kw


def use_engine(cfg: GenerateConfig) -> bool:
    """The lean engine when asked, or (auto) on the CPU for the families it runs; CUDA and `--engine
    hf` take the Hugging Face model."""
    if cfg.engine == "hf" or (cfg.engine == "auto" and cfg.device == "cuda"):
        return False
    f = cfg.file
    weights = source_weights(cfg.model, f.weights, f.adapter)
    folder = cfg.offload or f.model_dir or default_model_dir(cfg.model, weights, f.head_weights or default_head(weights),
                                                             f.adapter)
    model_type, ok = engine_runs(cfg.model, folder)
    if not ok:
        raise DipstreamError(f"the lean engine does not run '{model_type}' models (a mixture-of-experts model: "
                             "`eval`, `simulate` and `sweep` run it)")
    return True


def run_generate(cfg: GenerateConfig, out=None) -> dict:
    """Generate (streaming to ``out``, default stdout, when cfg.stream); returns a results row."""
    cfg.validate()
    if use_engine(cfg):
        cfg.validate_lean()
        from dipstream.runtime.engine_generate import run_engine

        return run_engine(cfg, out)
    cfg.validate_hf()
    from dipstream.runtime.hf_generate import run_hf

    return run_hf(cfg, out)
