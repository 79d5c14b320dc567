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
        return int(self.rng.choice(z.size, p=p / p.sum()))


def generate(decoder, ids: list[int], opts: DecodeOptions, eos=(), on_token=None) -> dict:
    """Prompt pass and decode. Returns the new ids, the time to the first token, each decode step's
    time, and the bytes this process read from storage in each phase (-1 where unknown); a decode
    stopped by Ctrl-C or SIGTERM returns what it made, marked `interrupted`."""
    pick = Sampler(opts)
    decoder.reset()
    read0, t0 = disk_read_bytes(), time.perf_counter()
    token = pick(decoder.prefill(ids))
    ttft, read1 = time.perf_counter() - t0, disk_read_bytes()
    out, steps = [token], []
    if on_token:
        on_token(out)
    pos, interrupted = len(ids), False
    try:
        while len(out) < opts.max_new_tokens and not (opts.stop_at_eos and token in eos):
            t = time.perf_counter()
            token = pick(decoder.step(token, pos))
            steps.append(time.perf_counter() - t)
            out.append(token)
            pos += 1
            if on_token:
                on_token(out)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the tokens so far are the result (the caller re-raises)
        interrupted = True
    read2 = disk_read_bytes()
    known = min(read0, read1, read2) >= 0
    return {"ids": out, "ttft_s": ttft, "step_s": steps, "prompt_read_bytes": read1 - read0 if known else -1,
            "decode_read_bytes": read2 - read1 if known else -1, "interrupted": interrupted}


def timing_row(res: dict) -> dict:
    """The figures every generate run reports of `generate`'s result."""
    steps = res["step_s"]
    return {"new_tokens": len(res["ids"]), "interrupted": res.get("interrupted", False), "ttft_s": res["ttft_s"],
            "decode_steps": len(steps),
            "decode_s": sum(steps), "decode_tokens_per_s": len(steps) / sum(steps) if steps else None,
            "ids": res["ids"]}
