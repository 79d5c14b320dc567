"""The typed configs of the experiment commands (`eval`, `simulate`, `lm-eval`, `sweep`): light
modules only, so that `--help` and the refusal of bad options need no torch; what a check needs
of the heavy stack (the method registry, adapter folders) it imports when it runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from dipstream.budget import check_density
from dipstream.devices import DEVICE_HELP, check_device_name
from dipstream.errors import DipstreamError, user_errors
from dipstream.experiments.executors import EXECUTORS
from dipstream.options import MethodOptions
from dipstream.simulator.hardware import parse_dram
from dipstream.simulator.policies import CacheOptions
from dipstream.sparsity.catalog import method_info
from dipstream.validation import at_least, input_dir, input_file, output_file


@dataclass
class EvalConfig:
    """One evaluation run."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "built-in model name (see `dipstream models`) or a local HF checkpoint folder"})
    method: str = field(default="dip", metadata={"help": "sparsity method (see `dipstream methods`)"})
    density: float = field(default=0.5, metadata={
        "help": "target fraction of MLP weight bytes a token may read, in (0, 1]"})
    corpus: str = field(default="wiki", metadata={
        "help": "built-in corpus: wiki, code, shakespeare or wikitext2 (evaluated on its eval split)"})
    split: str = field(default="eval", metadata={
        "help": "split of --corpus evaluated: eval (reported figures) or val (to choose settings "
                "without looking at the eval text)", "choices": ["eval", "val"]})
    text: str | None = field(default=None, metadata={
        "help": "evaluate on this local UTF-8 file instead (calibration still uses --corpus train)",
        "metavar": "PATH"})
    device: str = field(default="auto", metadata={"help": "where the model runs: " + DEVICE_HELP})
    dtype: str = field(default="float32", metadata={
        "help": "dtype of the model's weights and activations: float32, float64 (no near-tie noise in "
                "top-k, about 2x slower on CPU), bfloat16 or float16",
        "choices": ["float32", "float64", "bfloat16", "float16"]})
    seq_len: int = field(default=512, metadata={"help": "window length in tokens, BOS included"})
    tokens: int | None = field(default=None, metadata={
        "help": "cap on evaluated (predicted) tokens; whole windows only"})
    calib_tokens: int = field(default=4096, metadata={
        "help": "tokens of the train split used to calibrate threshold methods"})
    thresholds: str | None = field(default=None, metadata={
        "help": "load calibrated thresholds from this JSON file instead of calibrating",
        "metavar": "PATH"})
    save_thresholds: str | None = field(default=None, metadata={
        "help": "also write the calibrated thresholds to this JSON file", "metavar": "PATH"})
    adapter: str | None = field(default=None, metadata={
        "help": "apply the LoRA adapters / predictors of this `dipstream finetune` output folder",
        "metavar": "DIR"})
    json: str | None = field(default=None, metadata={
        "help": "write the result as one JSON object to this file", "metavar": "PATH"})
    options: MethodOptions = field(default_factory=MethodOptions)

    def validate(self) -> None:
        """Check every option, input file and output path before anything is loaded or run."""

        check_density(self.density)
        check_device_name(self.device)
        at_least("seq_len", self.seq_len, 2)
        at_least("tokens", self.tokens, 1, optional=True)
        at_least("calib_tokens", self.calib_tokens, 1)
        self.options.validate()
        if method_info(self.method).needs_calibration and not self.thresholds \
                and self.calib_tokens < self.seq_len - 1:
            raise DipstreamError(f"--calib-tokens {self.calib_tokens} is less than one calibration window "
                                 f"of {self.seq_len - 1} tokens; raise it or lower --seq-len")
        input_file("text", self.text, "UTF-8 text file")
        input_file("thresholds", self.thresholds, "thresholds JSON file")
        if self.adapter:
            from dipstream.models.adapter_folder import check_files, read_meta

            folder = input_dir("adapter", self.adapter, "finetune --out folder")
            check_files(folder, read_meta(folder))
        output_file("json", self.json)
        output_file("save_thresholds", self.save_thresholds)


@dataclass
class SimConfig(CacheOptions):
    """Hardware, DRAM size and caches of a simulated device."""

    hardware: str = field(default="a18", metadata={
        "help": "hardware preset (a18, android-ufs4, laptop) or a YAML/JSON file"})
    dram: str = field(default="0.5x", metadata={
        "help": "DRAM capacity: bytes ('4GB', '512MiB') or relative to the model's weight bytes ('0.5x')"})
    hw_set: str | None = field(default=None, metadata={
        "help": "override hardware fields, comma-separated, e.g. 'overlap=true,compute_flops=2e12,"
                "flash_read_latency_s=1e-4,flash_queue_depth=8,bundle=true' (see Hardware)",
        "metavar": "K=V,..."})
    trace: str | None = field(default=None, metadata={
        "help": "replay this mask trace (.npz) instead of running the model", "metavar": "PATH"})
    save_trace: str | None = field(default=None, metadata={
        "help": "write the run's per-token masks to this .npz trace", "metavar": "PATH"})
    batch_size: int = field(default=8, metadata={
        "help": "windows evaluated together (each window keeps its own cache); larger batches "
                "amortise DIP-CA's per-token cache scan but need more memory for the logits"})

    def validate(self) -> None:
        """Check the device (hardware file, overrides, DRAM size, caches) and the files before any
        model is loaded; one-line errors."""

        with user_errors():
            CacheOptions.validate(self)
        at_least("batch_size", self.batch_size, 1)
        try:
            parse_dram(self.dram, 1.0)
        except ValueError as exc:
            raise DipstreamError(f"--dram: {exc}") from None
        hardware_of(self)
        input_file("trace", self.trace, "mask trace (.npz)")
        output_file("save_trace", self.save_trace)


@dataclass
class SimulateConfig:
    """One simulate run: an evaluation plus a simulated device."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    sim: SimConfig = field(default_factory=SimConfig)


def hardware_of(sim: SimConfig):
    """The Hardware of a SimConfig: preset or file, then --hw-set overrides."""
    import yaml

    from dipstream.simulator import load_hardware


    overrides = {}
    for item in filter(None, (sim.hw_set or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise DipstreamError(f"--hw-set item '{item}' is not KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    with user_errors():
        return load_hardware(sim.hardware, **overrides)


@dataclass
class LmEvalConfig:
    """One lm-eval run of a model x method x density."""

    tasks: str = field(default="", metadata={
        "help": "comma-separated lm-eval task names (built-in ones need their data cached locally)"})
    include_path: str | None = field(default=None, metadata={
        "help": "folder of extra task YAML files (local data: dataset_path json + data_files)",
        "metavar": "DIR"})
    builtin_tasks: bool = field(default=True, metadata={
        "help": "also index lm-eval's built-in tasks (scanning them takes seconds; "
                "--no-builtin-tasks when every task comes from --include-path)"})
    num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples per task"})
    limit: float | None = field(default=None, metadata={
        "help": "examples per task (or a fraction if < 1); for quick checks only"})
    lm_batch_size: int = field(default=1, metadata={"help": "lm-eval batch size"})
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SweepOptions:
    """How to run a sweep (what to run is the YAML file)."""

    results: str | None = field(default=None, metadata={
        "help": "results folder (default: the config's `results` key, else results/<config name>)",
        "metavar": "DIR"})
    jobs: int | None = field(default=None, metadata={
        "help": "runs at a time (default: local: the number of CPUs, each with CPUs/jobs torch "
                "threads; ray: the cluster's CPUs)"})
    gpus: int | None = field(default=None, metadata={
        "help": "local: GPUs to spread the workers over, one per worker (default: every visible GPU, "
                "and then one worker per GPU unless --jobs says otherwise; 0: none)"})
    executor: str = field(default="local", metadata={
        "help": "local (process pool), serial (in this process) or ray (a Ray cluster; pip install "
                "ray)", "choices": EXECUTORS})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join, e.g. 'ray://head:10001' or 'auto' (default: start a local one)",
        "metavar": "ADDR"})
    dry_run: bool = field(default=False, metadata={
        "help": "list the runs still to do and the model runs they need; run nothing"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar with an ETA"})
