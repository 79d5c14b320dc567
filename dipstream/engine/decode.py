"""The decode loop every generation runs (the engine, and the Hugging Face front end through the
same interface): a prompt pass, then one token at a time, greedy or sampled by one seeded sampler.

A *decoder* is any object with

    reset()               forget the sequence (a new KV cache)
    prefill(ids) -> logits   the prompt's pass; the logits (vocab,) after its last token
    step(token, pos) -> logits   one token at position pos; the logits after it

whose logits are float32 numpy vectors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dipstream.devices import disk_read_bytes
from dipstream.errors import DipstreamError
from dipstream.validation import at_least, finite


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
    top_p: float = field(default=1.0, metadata={
        "help": "sample among the most likely tokens whose probabilities sum to top-p (nucleus sampling; 1: all)"})
    sample_seed: int = field(default=0, metadata={"help": "seed of the sampler"})

    def validate(self) -> None:
        """One-line errors for values out of range or of the wrong type (from the CLI, the Python API
        and the server's requests)."""
        for name in ("max_new_tokens", "top_k", "sample_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise DipstreamError(f"{name.replace('_', '-')} {v!r} is not an integer")
        at_least("max_new_tokens", self.max_new_tokens, 1)
        at_least("top_k", self.top_k, 0)
        finite("temperature", self.temperature, lo=0, lo_open=True)
        finite("top_p", self.top_p, lo=0, lo_open=True, hi=1)
        if not 0 <= self.sample_seed < 1 << 63:
            raise DipstreamError(f"--sample-seed {self.sample_seed} is out of range: give an integer from 0 to 2^63 - 1")


class Sampler:
    """Greedy (argmax), or one seeded stream of samples at a temperature among the top-k logits:
    the same seed gives the same tokens from the same logits on every path."""

    def __init__(self, opts: DecodeOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.sample_seed)

    def __call__(self, logits: np.ndarray) -> int:
        o = self.opts
        if not o.sample:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / max(o.temperature, 1e-6)
        if o.top_k > 0:
            k = min(o.top_k, z.size)
            z = np.where(z < np.partition(z, -k)[-k], -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if o.top_p < 1.0:  # the smallest set of most likely tokens reaching top_p (the first always kept)
            order = np.argsort(-p, kind="stable")
            cut = int(np.searchsorted(np.cumsum(p[order]), o.top_p)) + 1
            keep = np.zeros(p.size, bool)
            keep[order[:cut]] = True
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(z.size, p=p))


def token_stream(decoder, ids: list[int], opts: DecodeOptions, eos=(), timing: dict | None = None):
    """The new tokens one at a time: the prompt pass, then a decode step per token until
    max_new_tokens or (with stop_at_eos) an end-of-sequence id, which is yielded too. `timing`, when
    given, receives the time to the first token, each decode step's time and the bytes this process
    read from storage in each phase (-1 where unknown); the consumer's time between tokens is not
    counted."""
    timing = {} if timing is None else timing
    pick = Sampler(opts)
    decoder.reset()
    read0, t0 = disk_read_bytes(), time.perf_counter()
    token = pick(decoder.prefill(ids))
    timing.update(ttft_s=time.perf_counter() - t0, step_s=[], prompt_read_bytes=-1, decode_read_bytes=-1)
    read1 = disk_read_bytes()
    if min(read0, read1) >= 0:
        timing["prompt_read_bytes"] = read1 - read0
    new, pos = 1, len(ids)
    try:
        yield token
        while new < opts.max_new_tokens and not (opts.stop_at_eos and token in eos):
            t = time.perf_counter()
            token = pick(decoder.step(token, pos))
            timing["step_s"].append(time.perf_counter() - t)
            new, pos = new + 1, pos + 1
            yield token
    finally:
        read2 = disk_read_bytes()
        if min(read1, read2) >= 0:
            timing["decode_read_bytes"] = read2 - read1


def generate(decoder, ids: list[int], opts: DecodeOptions, eos=(), on_token=None) -> dict:
    """Prompt pass and decode (`token_stream`). Returns the new ids, the time to the first token,
    each decode step's time, and the bytes this process read from storage in each phase (-1 where
    unknown); `on_token(ids)` sees the ids so far after each token and stops the decode by returning
    True; a decode stopped by Ctrl-C or SIGTERM returns what it made, marked `interrupted`."""
    timing: dict = {}
    out, interrupted = [], False
    tokens = token_stream(decoder, ids, opts, eos, timing)
    try:
        for token in tokens:
            out.append(token)
            if on_token and on_token(out):
                break
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the tokens so far are the result (the caller re-raises)
        if not out:
            raise
        interrupted = True
    finally:
        tokens.close()
    return {"ids": out, **timing, "interrupted": interrupted}


def timing_row(res: dict) -> dict:
    """The figures every generate run reports of `generate`'s result."""
    steps = res["step_s"]
    return {"new_tokens": len(res["ids"]), "interrupted": res.get("interrupted", False), "ttft_s": res["ttft_s"],
            "decode_steps": len(steps),
            "decode_s": sum(steps), "decode_tokens_per_s": len(steps) / sum(steps) if steps else None,
            "ids": res["ids"]}
