"""What the engine is built from: the options a user sets (`EngineOptions`, the CLI's flags) and
what a front end hands `build` (`EngineSetup`: the method's decode rule and budget, the sequence
length, where the MLP lives and how much RAM it may use)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dipstream.budget import LayerKeeps
from dipstream.engine.modelfile import VERIFY

KV_DTYPES = ("float32", "float16")
HEAD_PLACES = ("auto", "ram", "stream")
ACTIVATIONS = ("float32", "int8")  # int8: int4 / int8 products with activations quantized per input group
PREFETCH = ("auto", "predicted", "uncached", "off")


@dataclass
class EngineOptions:
    """How the engine runs: its reads, RAM, caches and arithmetic."""

    memory: str | None = field(default=None, metadata={
        "help": "with --offload: RAM budget for the whole process (bytes, e.g. '200MB'): what Python, the libraries, "
                "the static weights, the KV cache and the buffers leave goes to the MLP caches (default: size the "
                "caches by --dram as `simulate` does)", "metavar": "BYTES"})
    head: str = field(default="auto", metadata={
        "help": "where the output head (and embedding) lives: ram, stream (read from the model file each token: "
                "its RAM goes to the MLP caches) or auto (stream only when --memory cannot hold it); with --offload "
                "an untied embedding is always read from the file, one row a token", "choices": HEAD_PLACES})
    kv_cache: str = field(default="float32", metadata={
        "help": "KV cache precision (float16 halves it, as llama.cpp's default; float32 gives the Hugging Face "
                "model's numbers exactly)", "choices": KV_DTYPES})
    activations: str = field(default="float32", metadata={
        "help": "int8 multiplies int4 and int8 weights (the head too) by activations quantized to 8 bits per group "
                "of 32 inputs (as llama.cpp does; integer products, about 2x faster, a small perplexity cost), "
                "float32 exact", "choices": ACTIVATIONS})
    read_gap: str = field(default="32kB", metadata={
        "help": "with --offload: missed units closer than this in the file are read in one request (reading "
                "through the gap is cheaper than another request; 0: exact reads)", "metavar": "BYTES"})
    prefetch: str = field(default="auto", metadata={
        "help": "with --offload: start the next hook's reads before this hook's product: predicted (the units it "
                "will probably select), uncached (every unit it does not cache), auto (uncached where records "
                "are at most half --read-gap, else predicted) or off", "choices": PREFETCH})
    io_threads: int = field(default=8, metadata={"help": "with --offload: reads in flight"})
    direct_io: bool = field(default=True, metadata={
        "help": "with --offload: read with O_DIRECT (bypass the page cache); --no-direct-io reads through it"})
    verify: str = field(default="auto", metadata={
        "help": "check every tensor of the model file against its sha256: auto (on the folder's first open and "
                "whenever model.bin or model.json change; about 1 s per GB read), always, or never (the manifest's "
                "checks only)", "choices": VERIFY})


@dataclass
class EngineSetup:
    """What `build` makes: a method's decode rule (`sparsity.decoding`) and per-layer budget, the
    longest sequence, and where the MLP lives: in RAM, or (`offload`) in the model file behind
    caches of `cache_bytes`, or of what `options.memory` (the whole process) or `dram` (weights and
    KV cache, as `simulate` places DRAM) leaves."""

    rule: object
    keeps: LayerKeeps
    max_seq: int
    options: EngineOptions = field(default_factory=EngineOptions)
    threads: int = 1
    offload: bool = False
    dram: str | None = None
    cache_bytes: int | None = None
    policy: str = "lru"
    policy_kwargs: dict = field(default_factory=dict)
    record_masks: bool = False
