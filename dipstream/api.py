"""dipstream from Python: the engine (`load` -> `Engine`: generate, stream, chat, stats) and the
accuracy lab (`attach` a method to your own transformers model, `perplexity` of a text).

    import dipstream
    with dipstream.load("smollm2-135m", method="dip", density=0.5) as engine:
        print(engine.generate("The three primary colours are", max_tokens=16).text)

The engine takes the options of `dipstream generate` as keyword arguments (their flag names with
underscores: ``offload="DIR"``, ``memory="300MB"``, ``activations="int8"``, ...). The engine and the
decoding options need no torch; `attach` and `perplexity` import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

from dipstream.config import flat
from dipstream.engine.decode import DecodeOptions
from dipstream.errors import DipstreamError
from dipstream.runtime.engine_generate import DEFAULT_CONTEXT
from dipstream.runtime.generate import GenerateConfig, use_engine



@dataclass
class Completion:
    """One generation: its text (stop string and end-of-sequence token left out), the new ids, why
    it ended ("stop": end of sequence or a stop string; "length": max_tokens or the context) and its
    figures (`Engine.stats` keys of one run)."""

    text: str
    ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: dict = field(default_factory=dict)


@dataclass
class SessionConfig(GenerateConfig):
    """An engine kept loaded for many prompts (`serve`, `chat`): `generate`'s options but the
    one-prompt ones, and the context it holds."""

    CLI_HIDDEN = ("prompt", "chat", "stream", "trace", "json")

    context: int | None = field(default=None, metadata={
        "help": "tokens of prompt and answer one generation may take: the KV cache is sized for it and counted "
                f"in --memory (default: the model's context, at most {DEFAULT_CONTEXT})"})

    def validate(self) -> None:
        super().validate()
        if self.context is not None and (isinstance(self.context, bool) or not isinstance(self.context, int)
                                         or self.context < 2):
            raise DipstreamError(f"--context {self.context!r}: give the tokens one generation may take (at least 2)")
        if self.trace or self.json:
            raise DipstreamError("trace and json are `dipstream generate`'s; a session reports through stats()")


def open_engine(cfg: SessionConfig) -> "Engine":
    """The engine of a session's config, every option checked before the model is loaded."""
    cfg.validate()
    if not use_engine(cfg):
        raise DipstreamError("the session runs the lean engine on the CPU: drop --engine hf / --device cuda")
    cfg.validate_lean()
    return Engine(cfg, cfg.context)


def load(model: str = "smollm2-135m", *, method: str = "dip", density: float = 0.5,
         context: int | None = None, **options) -> "Engine":
    """An engine on `model` (a built-in name, a GGUF path or a Hugging Face folder), its model file
    exported on first use, holding prompts and answers of up to `context` tokens (default: the model's
    context, at most 2048). `options`: any of
    `dipstream generate`'s options (see `dipstream generate --help`), e.g. ``offload``, ``memory``,
    ``weights``, ``threads``, ``activations``, ``kv_cache``, ``gamma``; the decoding options
    (``temperature`` ...) are the defaults of each `generate` call. Close it (or use ``with``)."""
    try:
        cfg = flat(SessionConfig, model=model, method=method, density=density, context=context, stream=False,
                   **options)
    except TypeError as exc:
        raise DipstreamError(f"dipstream.load: {exc} (the options are `dipstream generate`'s, with underscores)") \
            from None
    return open_engine(cfg)


class Engine:
    """A model loaded on the lean engine (`load` makes one). One generation runs at a time."""

    def __init__(self, cfg: GenerateConfig, context: int | None = None):
        from dipstream.runtime.engine_generate import EngineSession

        self.config = cfg
        self.session = EngineSession(cfg, context)
        self.last: Completion | None = None
        self._totals = {"total_requests": 0, "total_prompt_tokens": 0, "total_new_tokens": 0}

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the model (its memory and file handles); the engine cannot generate afterwards."""
        self.session.close()

    @property
    def context(self) -> int:
        return self.session.context

    def decode_options(self, max_tokens: int | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       ignore_eos: bool = False) -> DecodeOptions:
        """The engine's decoding defaults with these overrides; a temperature of 0 is greedy, any
        other samples (seeded by `seed`, default the configured --sample-seed)."""
        d = self.config.decoding
        opts = dataclasses.replace(d, max_new_tokens=d.max_new_tokens if max_tokens is None else max_tokens,
                                   stop_at_eos=d.stop_at_eos and not ignore_eos)
        if temperature is not None:
            opts = dataclasses.replace(opts, sample=temperature > 0, temperature=temperature or 1.0)
        for name, value in (("top_k", top_k), ("top_p", top_p), ("sample_seed", seed)):
            if value is not None:
                opts = dataclasses.replace(opts, **{name: value})
        opts.validate()
        return opts

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None, stop=(),
               **decoding) -> Iterator[str]:
        """The answer's text piece by piece as it is generated (a piece may hold several tokens:
        text is held back while it could be the start of a stop string or of a UTF-8 character).
        `messages`: a chat ([{"role": ..., "content": ...}]) rendered by the model's chat template,
        instead of `prompt`. `stop`: strings that end the answer (not included). `decoding`: the
        overrides of `decode_options`. When the iterator ends, `last` holds the `Completion`. Bad
        values are refused here, before the iterator is returned."""
        stops = stop_strings(stop)
        opts = self.decode_options(**decoding)
        if (prompt is None) == (messages is None):
            raise DipstreamError("give a prompt or chat messages (one of them)")
        ids = self.session.prompt_ids(prompt, messages)
        self.session.fit(ids, opts)  # a prompt that leaves no room refused now
        return self._pieces(ids, opts, stops)

    def _pieces(self, ids: list[int], opts: DecodeOptions, stops: list[str]) -> Iterator[str]:
        s = self.session
        timing: dict = {}
        before = s.lm.mlp.counters.__dict__.copy(), s.lm.streamed_bytes
        new: list[int] = []
        text, sent, reason = "", 0, "length"
        for token in s.tokens(ids, opts, timing):
            new.append(token)
            if token in s.eos and opts.stop_at_eos:
                reason = "stop"
                break
            text = s.tokenizer.decode(new)
            cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                break
            safe = len(text) - max((len(x) - 1 for x in stops), default=0)  # a stop string may be starting
            while safe > sent and text[safe - 1] == "\ufffd":  # a character's bytes still coming
                safe -= 1
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if len(text) > sent:
            yield text[sent:]
        self.last = Completion(text, new, reason, len(ids), _figures(s, timing, len(ids), new, before))
        self._totals["total_requests"] += 1
        self._totals["total_prompt_tokens"] += len(ids)
        self._totals["total_new_tokens"] += len(new)

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, stop=(),
                 **decoding) -> Completion:
        """The whole answer (`stream`'s arguments)."""
        for _ in self.stream(prompt, messages=messages, stop=stop, **decoding):
            pass
        return self.last

    def chat(self, messages: list[dict], **kwargs) -> Completion:
        """The assistant's answer to `messages` (the model's chat template)."""
        return self.generate(messages=messages, **kwargs)

    def count_tokens(self, prompt: str | None = None, *, messages: list[dict] | None = None) -> int:
        """Tokens the prompt (or the rendered chat) takes of the context."""
        return len(self.session.prompt_ids(prompt, messages))

    def stats(self) -> dict:
        """The engine (model, method, formats, RAM plan, offload, caches), the last generation's
        figures (time to first token, tokens/s, MB read per token, hit rate, peak RSS) and the totals."""
        return {**self.session.row(), "context": self.context, **(self.last.stats if self.last else {}),
                **self._totals}


def stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > 16 or not all(isinstance(x, str) and x for x in stops):
        raise DipstreamError("stop: give up to 16 non-empty strings")
    return stops


def _figures(session, timing: dict, prompt_tokens: int, new: list[int], before) -> dict:
    """One generation's figures: time to first token, decode rate, what the MLP and the streamed
    head read per token, the cache hit rate, the process's peak RSS."""
    from dipstream.devices import peak_rss_bytes

    c0, head0 = before
    c = session.lm.mlp.counters.__dict__
    d = {k: c[k] - c0[k] for k in c}
    tokens = max(d["tokens"], 1)
    steps = timing.get("step_s", [])
    return {"prompt_tokens": prompt_tokens, "new_tokens": len(new), "ttft_s": timing.get("ttft_s"),
            "decode_tokens_per_s": len(steps) / sum(steps) if steps and sum(steps) > 0 else None,
            "disk_bytes_per_token": (d["disk_bytes"] + session.lm.streamed_bytes - head0) / tokens,
            "hit_rate": d["hit_rate_sum"] / d["hit_rate_n"] if d["hit_rate_n"] else None,
            "peak_rss_bytes": peak_rss_bytes()}


# ------------------------------------------------------------------ the accuracy lab

def attach(model, method: str = "dip", density: float = 0.5, calibration_ids=None, **options):
    """Attach a registered sparsity method (see `dipstream methods`) to an unmodified transformers
    model; returns the `SparseModel` (``.stats`` the measured density, ``.detach()`` restores the
    model). `options`: the method's options (`MethodOptions`: ``up_keep``, ``gamma`` ...). A
    calibrated method (TEAL, CATS) needs `calibration_ids` (a (windows, tokens) tensor of ids)."""
    from dipstream.sparsity import MethodOptions, build_method
    from dipstream.sparsity import attach as attach_method

    try:
        opts = MethodOptions(**options)
    except TypeError as exc:
        raise DipstreamError(f"dipstream.attach: {exc}") from None
    m = build_method(method, density, opts)
    if m.needs_calibration and calibration_ids is None:
        raise DipstreamError(f"method {method} sets its thresholds on calibration text: pass calibration_ids")
    sm = attach_method(model, m)
    if m.needs_calibration:
        from dipstream.sparsity.calibration import calibrate

        try:
            calibrate(sm, calibration_ids)
        except BaseException:
            sm.detach()
            raise
    return sm


def perplexity(model, tokenizer, text: str, seq_len: int = 512, max_tokens: int | None = None,
               on_window=None) -> float:
    """Perplexity of `model` on `text` cut into windows of `seq_len` tokens (BOS + seq_len - 1, as
    `dipstream eval`), at most `max_tokens` predicted tokens; `on_window()` runs before each window
    (a SparseModel's ``method.reset``)."""
    from dipstream.data import make_windows
    from dipstream.evaluation import perplexity as evaluate

    windows = make_windows(tokenizer, text, seq_len, max_tokens)
    return evaluate(model, windows, on_window=on_window, progress=False).perplexity
