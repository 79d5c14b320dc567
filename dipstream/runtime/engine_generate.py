"""`dipstream generate` on the lean engine (:mod:`dipstream.engine`): the model file exported once
(in --model-dir, or with --offload DIR in DIR), the MLP in RAM or offloaded with its caches sized
by --memory (the whole process) or --dram (weights and KV cache, as `simulate` places DRAM)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from dipstream import __version__
from dipstream.budget import layer_keeps
from dipstream.devices import available_ram, peak_rss_bytes, rss_bytes
from dipstream.engine.build import build
from dipstream.engine.config import EngineSetup
from dipstream.engine.decode import DecodeOptions, generate, timing_row, token_stream
from dipstream.engine.export import ensure_model_file
from dipstream.engine.plan import budget_breakdown, kv_bytes
from dipstream.engine.modelfile import is_mlp_tensor, read_manifest
from dipstream.engine.text import FolderTokenizer, encode_prompt, eos_ids, text_streamer
from dipstream.errors import DipstreamError
from dipstream.io import write_json_atomic
from dipstream.names import layer_key
from dipstream.paths import machine
from dipstream.simulator.hardware import parse_bytes
from dipstream.simulator import save_trace
from dipstream.sparsity.decoding import decode_rule


def engine_setup(cfg, max_seq: int, n_layers: int) -> EngineSetup:
    """What `build` needs of a generate run (`cfg`: its GenerateConfig)."""
    keeps = layer_keeps(cfg.density, n_layers, cfg.dip.up_keep, cfg.dip.down_keep, cfg.dip.keep_file)
    return EngineSetup(decode_rule(cfg.method, cfg.ca), keeps, max_seq, cfg.run, cfg.threads or 1,
                       offload=bool(cfg.offload), dram=cfg.dram, policy=cfg.cache.policy,
                       policy_kwargs=cfg.policy_kwargs(), record_masks=bool(cfg.trace))


DEFAULT_CONTEXT = 2048


class EngineSession:
    """A model built once on the lean engine (`cfg`: a GenerateConfig) for any number of
    generations of up to `context` tokens each (prompt and new tokens; the KV cache is sized for it
    and counted in the RAM plan; None: the model's context, at most DEFAULT_CONTEXT). `tokenizer`: the folder's, kept loaded (the Python API, `serve`,
    `chat`), or None where the caller encoded its one prompt already (`generate`)."""

    def __init__(self, cfg, context: int | None, directory: Path | None = None, tokenizer: bool = True):
        f = cfg.file
        memory = None if cfg.run.memory is None else int(parse_bytes(cfg.run.memory))
        self.cfg = cfg
        self.directory = directory or ensure_model_file(cfg.model, f.weights, f.head_weights, cfg.offload or f.model_dir,
                                                        f.adapter, memory)
        self.tokenizer = FolderTokenizer(self.directory) if tokenizer else None  # resident before the plan
        if tokenizer:
            _warm_chat(self.directory)
        self.manifest = read_manifest(self.directory)
        self.context = int(context or min(DEFAULT_CONTEXT, self.manifest["arch"]["max_positions"]))
        self.chosen = fit_to_machine(cfg, self.directory, self.manifest, self.context)
        self.eos = eos_ids(self.directory, self.manifest["arch"]["eos"])
        setup = engine_setup(cfg, self.context, self.manifest["arch"]["shape"]["n_layers"])
        t_load = time.perf_counter()
        self.lm, self.plan = build(self.directory, setup)
        self.load_s = time.perf_counter() - t_load
        self.threads = setup.threads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
            self.lm = None

    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """The ids of a plain prompt (the tokenizer's BOS prefix added), or of chat `messages`
        rendered by the model's chat template with the assistant's turn opened."""
        if messages is not None:
            from dipstream.engine.chat import render_chat

            ids = self.tokenizer.encode(render_chat(self.directory, messages), add_special=False)
        else:
            ids = self.tokenizer.encode(prompt, add_special=True)
        if not ids:
            raise DipstreamError("the prompt is empty after tokenization; give some text")
        return ids

    def fit(self, ids: list[int], opts: DecodeOptions) -> DecodeOptions:
        """`opts` with max_new_tokens cut to what the context leaves after `ids` (a prompt that
        leaves no room is refused)."""
        room = self.context - len(ids)
        if room < 1:
            raise DipstreamError(f"the prompt has {len(ids)} tokens; this engine's context holds {self.context} "
                                 "(give a shorter prompt, or load it with a larger context)")
        return dataclasses.replace(opts, max_new_tokens=min(opts.max_new_tokens, room))

    def tokens(self, ids: list[int], opts: DecodeOptions, timing: dict | None = None):
        """The new token ids one at a time (`engine.decode.token_stream` on this engine)."""
        return token_stream(self.lm, ids, self.fit(ids, opts), self.eos, timing)

    def row(self) -> dict:
        """What a results row says of this engine: model, method, formats, RAM plan, offload."""
        cfg, manifest, m = self.cfg, self.manifest, self.lm.mlp
        row = {"model": cfg.model, "method": cfg.method, "density_requested": cfg.density, "engine": "lean",
               "weights": manifest["mlp_fmt"], "head_weights": manifest["head_fmt"],
               "activations": cfg.run.activations, "threads": self.threads, "model_dir": str(self.directory),
               "load_s": self.load_s, "family": manifest["arch"]["model_type"], "adapter": manifest.get("adapter"),
               "adapter_weights": manifest.get("adapter_weights", 0), **self.plan.row(),
               "budget_breakdown": budget_breakdown(manifest, self.plan)}
        if self.chosen:
            row["budget_chosen"] = self.chosen
        if cfg.offload:
            row.update(offload_dir=cfg.offload, policy=cfg.cache.policy, hot_profile=cfg.hot_profile,
                       direct_io=m.direct, cache_ram_bytes=m.cache_ram, capacity_in=m.capacity[layer_key(0, "in")],
                       capacity_out=m.capacity[layer_key(0, "out")], preload_bytes=m.preload_bytes,
                       model_file_bytes=int(manifest["size"]))
        return row


def _warm_chat(directory: Path) -> None:
    """Render the folder's chat template once (where it has one) so that jinja2 is in the process
    before the RAM plan measures it: a session's chats stay inside its budget."""
    from dipstream.engine.chat import render_chat

    try:
        render_chat(directory, [{"role": "user", "content": "hello"}])
    except DipstreamError:  # no template (a base model) or one that refuses this chat: nothing to load
        pass


def fit_to_machine(cfg, directory: Path, manifest: dict, context: int, available: int | None = None) -> str | None:
    """A budget that fits the machine when none is given: with neither --offload nor --memory, a
    model whose file and KV cache would take more than 90% of the RAM this process may still take
    (`devices.available_ram`) has its MLP streamed from its file (`directory`) under a budget of
    what the process holds now plus 80% of that. Changes `cfg`; returns what was chosen (printed)."""
    if cfg.offload or cfg.run.memory is not None:
        return None
    available = available_ram() if available is None else available
    need = int(manifest["size"]) + kv_bytes(manifest, context, cfg.run.kv_cache)
    if need <= 0.9 * available:
        return None
    budget = rss_bytes() + int(0.8 * available)
    cfg.offload, cfg.run.memory = str(directory), str(budget)
    chosen = (f"the model file and KV cache ({need / 1e6:.0f} MB) do not fit the {available / 1e6:.0f} MB this "
              f"machine has available: its MLP is streamed from {directory} with --memory {budget / 1e6:.0f}MB "
              "(give --offload and --memory to choose)")
    print(f"-- {chosen}", file=sys.stderr)
    return chosen


def run_engine(cfg, out=None) -> dict:
    """The lean engine's generate run of `cfg` (a GenerateConfig); returns the results row."""
    out = out or sys.stdout
    f = cfg.file
    memory = None if cfg.run.memory is None else int(parse_bytes(cfg.run.memory))
    directory = ensure_model_file(cfg.model, f.weights, f.head_weights, cfg.offload or f.model_dir, f.adapter, memory)
    ids, decode = encode_prompt(directory, cfg.prompt, cfg.chat)  # the encoder freed before the plan
    with EngineSession(cfg, len(ids) + cfg.decoding.max_new_tokens, directory, tokenizer=False) as session:
        lm = session.lm
        row = {**session.row(), "prompt_tokens": len(ids)}
        on_token = text_streamer(out, decode, cfg.stream, cfg.prompt)
        res = generate(lm, ids, cfg.decoding, session.eos, on_token)
        if cfg.stream:
            out.write("\n")
        row.update(timing_row(res), text=decode(res["ids"]), **_mlp_figures(lm, res))
        if res["prompt_read_bytes"] >= 0:  # what generate measured around the prompt and the decode
            row["process_disk_read_bytes"] = res["prompt_read_bytes"] + res["decode_read_bytes"]
        if cfg.trace:
            meta = {"model": cfg.model, "method": cfg.method, "density": cfg.density, **lm.shape.to_dict()}
            save_trace(lm.mlp.rec.trace(len(ids), meta), cfg.trace)
            row["trace"] = cfg.trace
    row.update(machine=machine(), dipstream=__version__)
    if cfg.json:
        write_json_atomic(cfg.json, row)
    if row.get("interrupted"):  # kept what was made; the command stops as interrupted
        raise KeyboardInterrupt
    return row


def _mlp_figures(lm, res: dict) -> dict:
    """Per token figures of the MLP's reads and the process's memory."""
    c = lm.mlp.counters
    tokens = max(c.tokens, 1)
    steps = max(len(res["step_s"]), 1)
    head = lm.streamed_bytes  # a streamed head's and embedding's reads
    mlp_bytes = sum(t.nbytes for n, t in lm.manifest["tensor_info"].items() if is_mlp_tensor(n))
    return {"mlp_s_per_token": c.mlp_s / tokens, "disk_bytes_per_token": (c.disk_bytes + head) / tokens,
            "reads_per_token": c.reads / tokens, "head_disk_bytes_per_token": head / tokens,
            "ram_bytes_per_token": c.ram_bytes / tokens, "io_wait_s_per_token": c.io_wait_s / tokens,
            "prefetch_bytes_per_token": c.prefetch_bytes / tokens,
            "prefetch_precision": c.prefetch_useful / c.prefetch_units if c.prefetch_units else None,
            "prefetch_recall": c.prefetch_served / c.missed_units if c.missed_units else None,
            "hit_rate": c.hit_rate_sum / c.hit_rate_n if c.hit_rate_n else None,
            "density_measured": c.selected_bytes / tokens / mlp_bytes,
            "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(), "decode_steps_timed": steps,
            "prompt_read_bytes": res["prompt_read_bytes"],
            "decode_read_bytes_per_token": res["decode_read_bytes"] / steps if res["decode_read_bytes"] >= 0 else None}
