"""`dipstream finetune` options (the CLI is derived from these dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dipstream.experiments.configs import EvalConfig

DEFAULT_EVAL_TOKENS = 8176  # 16 windows of BOS + 511 when --tokens is not given


@dataclass
class TrainOptions:
    """How to train. Defaults finish in about 15 minutes for smollm2-135m on 2 CPU cores."""

    out: str | None = field(default=None, metadata={
        "help": "folder for the adapter, checkpoints and log; default runs/finetune/MODEL-METHOD-DENSITY. "
                "Re-running with the same folder resumes", "metavar": "DIR"})
    restart: bool = field(default=False, metadata={
        "help": "discard a checkpoint found in --out and start over"})
    loss: str = field(default="ce", metadata={
        "help": "ce: next-token cross-entropy; kd: KL divergence to the dense model (same weights, "
                "masks and adapters off)", "choices": ["ce", "kd"]})
    kd_temperature: float = field(default=1.0, metadata={"help": "kd: softmax temperature"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "LoRA alpha (scaling = alpha / rank); default 2 x rank with --lora-init peft, rank "
                "(scaling 1) with --lora-init reference"})
    lora_init: str = field(default="peft", metadata={
        "help": "initialisation of the adapters: peft (peft's: Kaiming-uniform A, B = 0) or reference "
                "(the DIP reference's: A ~ N(0, 1/r^2), B = 0, no scaling)", "choices": ["peft", "reference"]})
    lora_targets: str = field(default="mlp", metadata={
        "help": "linears that get adapters: mlp (the masked linears) or mlp+attn",
        "choices": ["mlp", "mlp+attn"]})
    steps: int = field(default=150, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=1, metadata={"help": "training windows (of --seq-len tokens) per step"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps, then cosine decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    val_every: int = field(default=25, metadata={
        "help": "steps between validations (and checkpoints)"})
    val_tokens: int = field(default=2044, metadata={
        "help": "tokens of the validation split scored at each validation"})
    patience: int = field(default=3, metadata={
        "help": "early stopping: validations without improvement before stopping"})
    max_epochs: float = field(default=4.0, metadata={
        "help": "refuse runs that would pass over the training text more often than this"})
    train_text: str | None = field(default=None, metadata={
        "help": "train on this UTF-8 file (first 90% train, last 10% validation) instead of the "
                "corpus's train/val splits", "metavar": "PATH"})
    act_l1: float = field(default=0.0, metadata={
        "help": "drelu/relufied: weight of a mean-|h| penalty pushing activations to zero"})
    predictor_rank: int = field(default=64, metadata={"help": "predictor: hidden width of each low-rank MLP"})
    predictor_tokens: int = field(default=32704, metadata={
        "help": "predictor: training tokens (dense activations are collected once)"})
    predictor_epochs: int = field(default=8, metadata={"help": "predictor: passes over those tokens"})
    train_seed: int = field(default=0, metadata={"help": "seed of data order and initialisation"})


@dataclass
class FinetuneConfig:
    """One fine-tuning run: what to train (model, method, density) and how."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
