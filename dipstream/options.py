"""Option groups shared by several commands, as plain dataclasses (no torch): DIP's budget split
and DIP-CA's re-weighting. The CLI flattens them into flags (`dipstream.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dipstream.validation import finite, input_file


@dataclass
class DipOptions:
    """How DIP splits its budget between up/gate and down inputs (the reference's by default)."""

    up_keep: float | None = field(default=None, metadata={
        "help": "DIP/TEAL/random: fraction of up/gate input columns kept (overrides the reference split)"})
    down_keep: float | None = field(default=None, metadata={
        "help": "DIP/TEAL/random: fraction of down input columns kept (overrides the reference split)"})
    keep_file: str | None = field(default=None, metadata={
        "help": 'JSON file of per-layer keeps: {"up_keep": [...], "down_keep": [...]}'})

    def validate(self) -> None:
        finite("up_keep", self.up_keep, lo=0, hi=1, optional=True)
        finite("down_keep", self.down_keep, lo=0, hi=1, optional=True)
        input_file("keep_file", self.keep_file, "JSON keep file")


@dataclass
class CacheAwareOptions:
    """DIP-CA's re-weighting of uncached units (docs/methods.md, "Cache-aware masking")."""

    gamma: float = field(default=0.1, metadata={
        "help": "dip-ca: weight of uncached units' scores in [0, 1] (1 = plain DIP)"})
    n0_frac: float = field(default=0.5, metadata={
        "help": "dip-ca: fraction of k protected as the top-n0 scores, never down-weighted"})
    warmup: bool = field(default=True, metadata={
        "help": "dip-ca: warm gamma up over a sequence's first tokens, gamma_t = 1 - (1 - gamma)(1 - "
                "gamma^(t/4)) (the reference's schedule); --no-warmup uses gamma from the first token"})

    def validate(self) -> None:
        finite("gamma", self.gamma, lo=0, hi=1)
        finite("n0_frac", self.n0_frac, lo=0, hi=1)


@dataclass
class MethodOptions(DipOptions, CacheAwareOptions):
    """Knobs some methods read (the CLI shows each field's help)."""

    prompt_frac: float = field(default=0.5, metadata={
        "help": "GRIFFIN: fraction of each window treated as the dense prompt"})
    seed: int = field(default=0, metadata={"help": "random: seed of the random masks"})

    def validate(self) -> None:
        """One-line errors for out-of-range or non-finite values (before any model is loaded)."""
        DipOptions.validate(self)
        CacheAwareOptions.validate(self)
        finite("prompt_frac", self.prompt_frac, lo=0, hi=1, lo_open=True, hi_open=True)
