"""`dipstream generate`'s options (light: no torch, so the lean engine's runs stay small).
The methods the decode runtimes run are those of the method registry that declare `decodes`
(tests/test_engine.py checks the list against the registry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dipstream.budget import check_density
from dipstream.engine.run import EngineOptions
from dipstream.errors import DipstreamError, user_errors
from dipstream.options import CacheAwareOptions, DipOptions
from dipstream.simulator.hardware import parse_bytes, parse_dram
from dipstream.simulator.policies import OFFLINE_POLICIES, CacheOptions
from dipstream.validation import at_least, finite, input_dir, input_file, output_dir, output_file


@dataclass
class DecodeOptions:
    """How tokens are generated."""

    max_new_tokens: int = field(default=32, metadata={"help": "tokens to generate"})
    stop_at_eos: bool = field(default=True, metadata={
        "help": "stop at the end-of-sequence token (--no-stop-at-eos: always max_new_tokens)"})
    sample: bool = field(default=False, metadata={
        "help": "sample instead of greedy decoding (with --temperature, --top-k, --sample-seed)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "sample among the top-k tokens (0: all)"})
    sample_seed: int = field(default=0, metadata={"help": "seed of the sampler"})


DECODE_METHODS = ("dense", "dip", "dip-ca")


@dataclass
class GenerateConfig:
    """One generation run: model, method, decoding, and (with --offload) the RAM and its caches."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "built-in model name (see `dipstream models`) or a local HF checkpoint folder"})
    method: str = field(default="dip", metadata={
        "help": "a method the runtimes run: " + ", ".join(DECODE_METHODS)
                + " (dip-ca needs --offload: it follows the runtime's cache)", "choices": DECODE_METHODS})
    density: float = field(default=0.5, metadata={
        "help": "fraction of MLP weight bytes a decoded token reads, in (0, 1]"})
    prompt: str = field(default="The three primary colours are", metadata={
        "help": "the text to continue"})
    chat: bool = field(default=False, metadata={
        "help": "wrap the prompt in the tokenizer's chat template (instruct models)"})
    decoding: DecodeOptions = field(default_factory=DecodeOptions)
    weights: str = field(default="float32", metadata={
        "help": "weight format: float32, int8 or int4 (4-bit in groups of 32); the lean engine stores every "
                "matrix so (in RAM and in its offload file), the Hugging Face engine only the sparse MLP of "
                "--method dip in RAM", "choices": ("float32", "int8", "int4")})
    dip: DipOptions = field(default_factory=DipOptions)
    ca: CacheAwareOptions = field(default_factory=CacheAwareOptions)
    adapter: str | None = field(default=None, metadata={
        "help": "apply the LoRA adapters of this `dipstream finetune` folder (dense and dip, in RAM)",
        "metavar": "DIR"})
    offload: str | None = field(default=None, metadata={
        "help": "keep the MLP weights in a file in this directory (written on first use) and "
                "only what --dram leaves for them in RAM", "metavar": "DIR"})
    dram: str = field(default="0.7x", metadata={
        "help": "with --offload: RAM for the model's weights and KV cache, as `simulate` places DRAM: "
                "bytes ('400MB') or a fraction of the model's weight bytes as stored (float32: '0.7x'); "
                "attention, embeddings and the KV cache take it first, the rest holds the MLP caches and "
                "one read buffer"})
    cache: CacheOptions = field(default_factory=CacheOptions)
    hot_profile: str | None = field(default=None, metadata={
        "help": "with --offload --policy hot (PowerInfer's placement: the units most read on other text pinned "
                "in RAM, the rest streamed): the unit counts, a profile .npz of `dipstream simulate --policy "
                "hot`; without it `dipstream generate` makes one on the corpus's train split",
        "metavar": "PATH"})
    lean: EngineOptions = field(default_factory=EngineOptions)
    direct_io: bool = field(default=True, metadata={
        "help": "with --offload: read with O_DIRECT (bypass the page cache); --no-direct-io reads "
                "through it"})
    io_threads: int = field(default=8, metadata={"help": "with --offload: reads in flight"})
    verify: bool = field(default=True, metadata={
        "help": "with --offload: check the file's sha256 when opening it"})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch and the sparse kernel (default: torch's)"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when present), cpu or cuda", "choices": ("auto", "cpu", "cuda")})
    stream: bool = field(default=True, metadata={"help": "print the text as it is generated"})
    trace: str | None = field(default=None, metadata={
        "help": "write this run's MLP masks (prompt included) as a simulator trace (.npz)",
        "metavar": "PATH"})
    json: str | None = field(default=None, metadata={
        "help": "write the result as one JSON object to this file", "metavar": "PATH"})

    def validate(self) -> None:
        """Every option, file and output path, before the model is loaded."""
        check_density(self.density)
        if self.method not in DECODE_METHODS:
            raise DipstreamError(f"--method {self.method}: the runtimes run {', '.join(DECODE_METHODS)}")
        d = self.decoding
        at_least("max_new_tokens", d.max_new_tokens, 1)
        at_least("top_k", d.top_k, 0)
        finite("temperature", d.temperature, lo=0, lo_open=True)
        at_least("threads", self.threads, 1, optional=True)
        at_least("io_threads", self.io_threads, 1)
        self.dip.validate()
        self.ca.validate()
        with user_errors():
            self.cache.validate()
        if self.cache.policy == "hot":
            if not self.offload:
                raise DipstreamError("policy hot pins units in the RAM of the offloading runtime: add --offload DIR")
            if self.method != "dip":
                raise DipstreamError(f"policy hot pins the units DIP reads most often; --method {self.method} "
                                     "does not run with it (use --method dip)")
            input_file("hot_profile", self.hot_profile, "unit-frequency profile (.npz)")
        elif self.cache.policy in OFFLINE_POLICIES:
            raise DipstreamError(f"policy '{self.cache.policy}' needs the future or the evaluated text's own "
                                 "counts; the runtime supports lru, lfu, window, none and hot (from a profile)")
        elif self.hot_profile:
            raise DipstreamError("--hot-profile is for --policy hot")
        if self.offload:
            try:
                parse_dram(self.dram, 1.0)
            except ValueError as exc:
                raise DipstreamError(f"--dram: {exc}") from None
        if self.trace and self.method == "dense" and not self.offload:
            raise DipstreamError("--trace records the sparse MLP's masks: a dense run in RAM has none; use "
                                 "--method dip, or --offload DIR for dense streaming's trace")
        if self.method == "dip-ca" and not self.offload:
            raise DipstreamError("dip-ca picks its masks from the runtime's RAM cache: run it with "
                                 "--offload DIR --dram BUDGET")
        input_dir("adapter", self.adapter, "finetune --out folder")
        output_file("json", self.json)
        output_file("trace", self.trace)
        output_dir("model_dir", self.lean.model_dir)
        for flag, value in (("--memory", self.lean.memory), ("--read-gap", self.lean.read_gap)):
            try:
                if value is not None:
                    parse_bytes(value)
            except ValueError as exc:
                raise DipstreamError(f"{flag}: {exc}") from None

    def policy_kwargs(self) -> dict:
        """The cache policy's arguments; for hot, the unit counts of --hot-profile."""
        kw = self.cache.policy_kwargs()
        if self.cache.policy == "hot":
            from dipstream.simulator.profile import load_profile

            freq, meta = load_profile(self.hot_profile)
            if meta.get("model") not in (None, self.model):
                raise DipstreamError(f"--hot-profile {self.hot_profile} was made for model {meta['model']}, not "
                                     f"{self.model}; give that model's profile or leave --hot-profile out")
            kw["frequency"] = freq
        return kw

    def validate_hf(self) -> None:
        """What the Hugging Face engine cannot do."""
        if self.offload and self.weights != "float32":
            raise DipstreamError("the Hugging Face engine's --offload keeps float32 weights on disk; drop "
                                 f"--weights {self.weights}, or use --engine lean (quantized offload file)")
        if self.weights != "float32" and self.method != "dip":
            raise DipstreamError(f"the Hugging Face engine applies --weights {self.weights} to DIP's sparse "
                                 "kernel: use it with --method dip, or use --engine lean")
        if self.adapter and self.offload:
            raise DipstreamError("--adapter runs with the MLP in RAM; drop --offload (the offloading "
                                 "runtime does not apply adapters)")
        if self.lean.memory is not None:
            raise DipstreamError("--memory sizes the lean engine's process; with the Hugging Face engine "
                                 "give --dram")

    def validate_lean(self) -> None:
        """What the lean engine cannot do."""
        if self.adapter or self.device == "cuda":
            raise DipstreamError("the lean engine runs on the CPU without adapters: drop --adapter / --device "
                                 "cuda, or use --engine hf")
