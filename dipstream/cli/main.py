"""`dipstream` command line: options come from the typed configs in dipstream.experiments."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager

from dipstream import __version__
from dipstream.config import add_dataclass_args, from_namespace
from dipstream.errors import DipstreamError

_COLUMNS = ("model", "method", "density_requested", "density_measured", "density_with_predictor",
            "density_expert_level", "density_in_experts", "perplexity", "bits_per_byte", "tokens", "seconds")


def _print_row(row: dict) -> None:
    for key in _COLUMNS:
        if key not in row:  # density_with_predictor, the expert levels: only some methods and models
            continue
        val = row[key]
        print(f"{key:>22}: {val:.4f}" if isinstance(val, float) else f"{key:>22}: {val}")
    if "device" in row:
        print(f"{'loaded':>22}: {row['dtype']} on {row['device']} in {row['load_seconds']:.1f} s, "
              f"peak memory {row['load_peak_mib']:.0f} MiB")


def cmd_eval(ns) -> int:
    from dipstream.experiments.configs import EvalConfig

    cfg = from_namespace(EvalConfig, ns)
    cfg.validate()  # before the model stack is imported
    from dipstream.experiments import run_eval

    row = run_eval(cfg)
    _print_row(row)
    return 0


def cmd_simulate(ns) -> int:
    from dipstream.experiments.configs import SimulateConfig

    cfg = from_namespace(SimulateConfig, ns)
    cfg.sim.validate()  # before the model stack is imported (the method registry imports it)
    cfg.eval.validate()
    from dipstream.experiments.simulate import run_simulate

    row = run_simulate(cfg)
    base = row["dense_streaming"]
    keys = ("perplexity", "density_measured", "tokens_per_s", "ttft_s", "hit_rate",
            "dram_bytes_per_token", "flash_bytes_per_token", "dram_used_bytes")
    print(f"{row['model']} {row['method']} @ {row.get('density_requested')} on {row['hardware']}, "
          f"DRAM {row['dram_bytes'] / 1e6:.1f} MB, policy {row['policy']}")
    print(f"{'':>22} {'method':>14} {'dense stream':>14}")
    for k in keys:
        a, b = row.get(k), base.get(k, "")
        fa = f"{a:>14.4g}" if isinstance(a, (int, float)) else f"{str(a):>14}"
        fb = f"{b:>14.4g}" if isinstance(b, (int, float)) else f"{str(b):>14}"
        print(f"{k:>22} {fa} {fb}")
    print(f"{'speed-up vs dense':>22} {row['speedup_vs_dense_streaming']:>14.3f}")
    return 0


_FINETUNE_KEYS = ("perplexity_dense", "perplexity_before", "perplexity_after", "perplexity_dense_with_adapter",
                  "gap_recovered", "density_measured", "recall_at_k", "steps_done", "stopped_early",
                  "adapter_weights", "adapter_file_bytes", "predictor_weights", "train_seconds",
                  "seconds_this_run")


def cmd_finetune(ns) -> int:
    from dipstream.training.config import FinetuneConfig

    cfg = from_namespace(FinetuneConfig, ns)
    cfg.eval.validate()  # before the model stack is imported
    from dipstream.training import run_finetune

    row = run_finetune(cfg)
    print(f"{row['model']} {row['method']} @ {row['density_requested']} -> {row['out']}"
          + (f" ({row['resumed']})" if row.get("resumed") else ""))
    for key in _FINETUNE_KEYS:
        if row.get(key) is not None:
            val = row[key]
            print(f"{key:>30}: {val:.4f}" if isinstance(val, float) else f"{key:>30}: {val}")
    return 0


def cmd_sweep(ns) -> int:
    from dipstream.experiments.sweep import SweepOptions, run_sweep

    s = run_sweep(ns.config, from_namespace(SweepOptions, ns))
    if "seconds" in s:
        print(f"{s['finished']} runs finished, {s['done_before']} were done before, {s['failed']} failed, "
              f"{s['model_runs']} model runs, {s['seconds']:.0f} s; results in {s['results']}")
    if s["failed"]:
        print("dipstream: some runs failed (see above); fix the cause and run the same command to "
              "retry them", file=sys.stderr)
        return 1
    return 0


def cmd_report(ns) -> int:
    import shlex

    from dipstream.reports import ReportConfig, make_report

    command = "dipstream " + " ".join(shlex.quote(a) for a in ns.argv)
    path = make_report(ns.results, from_namespace(ReportConfig, ns), command)
    print(f"wrote {path} and its figures")
    return 0


def cmd_lm_eval(ns) -> int:
    from dipstream.experiments.lm_eval import LmEvalConfig, run_lm_eval

    row = run_lm_eval(from_namespace(LmEvalConfig, ns))
    print(f"{row['model']} {row['method']} @ {row['density_requested']} (measured density "
          f"{row['density_measured']:.3f}), lm-eval {row['lm_eval']}, {row['seconds']:.0f} s")
    for task, scores in row["scores"].items():
        print(f"{task:>24}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in scores.items()))
    return 0


INTERPRETER_BYTES = 42_000_000  # a generate process before its model (baseline_rss of SmolLM2's runs, EPYC)


def _needs(gguf) -> str:
    """A GGUF's size and the RAM it needs: whole in RAM, and at the least with its MLP offloaded
    (the attention, embedding and head resident; estimates: a run's RAM plan gives the figures)."""
    from dipstream.engine.gguf_file import GGUFFile

    g = GGUFFile(gguf, keys=set())
    try:
        total = gguf.stat().st_size
        mlp = sum(t.n_bytes for n, t in g.tensors.items() if ".ffn_" in n and "norm" not in n)
    finally:
        g.close()
    least = INTERPRETER_BYTES + (total - mlp) + mlp // 20
    return (f"file {total / 1e6:.0f} MB (MLP {mlp / total:.0%}); needs about {(total + INTERPRETER_BYTES) / 1e6:.0f} "
            f"MB in RAM, or from about {least / 1e6:.0f} MB with its MLP streamed (--offload DIR --memory BYTES)")


def cmd_models(ns) -> int:
    from dipstream.models.loading import BUILTIN_MODELS, cache_complete
    from dipstream.paths import cache_root

    for m in BUILTIN_MODELS.values():
        cached = cache_complete(cache_root() / "models" / m.name)
        state = "cached" if cached else "not converted yet" if not m.optional else "optional"
        gguf = m.present()  # where it is there already: a listing assembles nothing
        state = "installed" if m.optional and gguf is not None else state
        print(f"{m.name:<19} {state:<18} {m.description}")
        if gguf is not None:
            print(f"{'':<19} {'':<18} {_needs(gguf)}")
        if m.note:
            print(f"{'':<19} {'':<18} note: {m.note}")
    from dipstream.models.families import ARCHITECTURES, engine_families

    from dipstream.engine.gguf_source import ARCHS

    print(f"or any local Hugging Face checkpoint folder of: {', '.join(sorted(ARCHITECTURES))} (the lean engine "
          f"runs {', '.join(engine_families())})")
    print(f"or a GGUF file (--model PATH.gguf) of architecture {', '.join(ARCHS)} (its blocks kept as they are)")
    return 0


def cmd_methods(ns) -> int:
    from dipstream.sparsity.catalog import CATALOG

    width = max(map(len, CATALOG))
    for name, m in CATALOG.items():
        calib = " [calibrated]" if m.needs_calibration else ""
        trained = " [trained: dipstream finetune]" if m.needs_predictors else ""
        moe = " [also inside MoE experts]" if m.on_experts else ""
        print(f"{name:<{width}} {m.summary}{calib}{trained}{moe}\n{'':<{width}}   reads: {m.reads}")
    return 0


_GEN_KEYS = ("prompt_tokens", "new_tokens", "ttft_s", "decode_tokens_per_s", "mlp_s_per_token",
             "io_wait_s_per_token", "reads_per_token", "disk_bytes_per_token", "ram_bytes_per_token",
             "hit_rate", "density_measured", "direct_io", "mlp_ram_bytes", "memory_budget", "dram_budget_bytes",
             "baseline_rss", "static_bytes", "kv_bytes", "cache_bytes", "peak_rss_bytes", "process_disk_read_bytes")


def _hot_profile_for(cfg) -> str:
    """The profile `generate --policy hot` pins by when none is given: DIP at the run's density and
    keeps over --calib-tokens of the wiki corpus's train split, as `simulate --policy hot` makes it
    (once; reused from $DIPSTREAM_CACHE/profiles)."""
    import dataclasses

    from dipstream.experiments import EvalConfig
    from dipstream.experiments.hot_profile import hot_frequencies
    from dipstream.experiments.simulate import SimConfig, evaluate_and_record
    from transformers import AutoConfig

    from dipstream.models.families import text_config
    from dipstream.models.loading import resolve_checkpoint, shape_of
    from dipstream.sparsity import MethodOptions

    context = getattr(text_config(AutoConfig.from_pretrained(resolve_checkpoint(cfg.model)[1])),
                      "max_position_embeddings", 512)
    ev = EvalConfig(model=cfg.model, method="dip", density=cfg.density, device="cpu", seq_len=min(512, context),
                    options=MethodOptions(**dataclasses.asdict(cfg.dip)))
    print(f"-- profiling DIP on the train split of '{ev.corpus}' for the hot units ({ev.calib_tokens} tokens, once)",
          file=sys.stderr)
    return hot_frequencies(ev, SimConfig(), shape_of(cfg.model), evaluate_and_record)[1]["hot_profile"]


def cmd_generate(ns) -> int:
    from dipstream.runtime.generate import GenerateConfig, run_generate

    cfg = from_namespace(GenerateConfig, ns)
    if cfg.cache.policy == "hot" and not cfg.hot_profile:
        cfg.validate()  # before the profiling run
        cfg.hot_profile = _hot_profile_for(cfg)
    row = run_generate(cfg)
    print(f"-- {row['model']} {row['method']} @ {row['density_requested']} "
          f"({row['engine']} engine, {row['weights']}, {row.get('device', 'cpu')}, {row['threads']} threads"
          + (f", offload {row['offload_dir']}, policy {row['policy']}" if row.get("offload_dir")
             else "") + ")", file=sys.stderr)
    for k in _GEN_KEYS:
        if row.get(k) is not None:
            v = row[k]
            print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}",
                  file=sys.stderr)
    if row.get("budget_breakdown"):
        parts = ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.1f}" for k, v in row["budget_breakdown"].items())
        print(f"{'RAM plan (MB)':>22}: {parts}", file=sys.stderr)
    return 0


def cmd_export(ns) -> int:
    from dipstream.engine.export import ExportConfig, run_export

    r = run_export(from_namespace(ExportConfig, ns))
    print(f"{r['model_dir']}: {r['family']} model, {r['weights']} weights ({r['head_weights']} head"
          + (f", LoRA adapters {r['adapter']} merged" if r["adapter"] else "") + f"), {r['bytes'] / 1e6:.1f} MB")
    print(f"export: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB", file=sys.stderr)
    return 0


def cmd_probe(ns) -> int:
    from dipstream.runtime.probe import ProbeConfig, run_probe

    out = run_probe(from_namespace(ProbeConfig, ns), log=lambda m: print(m, file=sys.stderr))
    hw, fit = out["hardware"], out["fit"]
    print(f"wrote {out['out']}")
    if "host_s_per_token" in out:
        print(f"  dram_bw {hw['dram_bw'] / 1e9:.2f} GB/s (the engine's products), host "
              f"{out['host_s_per_token'] * 1e3:.2f} ms/token, offloaded bookkeeping "
              f"{hw['host_s_per_cached_hook'] * 1e6:.0f} us per hook and token")
    else:
        print(f"  dram_bw {hw['dram_bw'] / 1e9:.2f} GB/s, compute_flops {hw['compute_flops'] / 1e9:.2f} "
              f"GFLOP/s (fused GEMV {out['gemv_bw'] / 1e9:.2f} GB/s)")
    print(f"  flash_bw {hw['flash_bw'] / 1e9:.3f} GB/s (direct I/O: {out['disk']['direct_io']}), "
          f"read latency {fit['latency_qd1_s'] * 1e6:.1f} us at 1 in flight, "
          f"{fit['per_read_s'] * 1e6:.1f} us/read at {out['disk']['io_threads']} "
          f"-> queue depth {hw['flash_queue_depth']}")
    return 0


def cmd_serve(ns) -> int:
    from dipstream.server import ServeConfig, run_serve

    return run_serve(from_namespace(ServeConfig, ns))


def cmd_chat(ns) -> int:
    from dipstream.chat_session import ChatConfig, run_chat

    return run_chat(from_namespace(ChatConfig, ns))


# the typed config class of each configured subcommand, imported only for the command that runs
# (a lean `generate` then loads no torch)
_CONFIGS = {"eval": "dipstream.experiments.configs:EvalConfig",
            "simulate": "dipstream.experiments.configs:SimulateConfig",
            "finetune": "dipstream.training.config:FinetuneConfig",
            "sweep": "dipstream.experiments.configs:SweepOptions",
            "lm-eval": "dipstream.experiments.configs:LmEvalConfig",
            "report": "dipstream.reports.report:ReportConfig",
            "generate": "dipstream.runtime.generate:GenerateConfig",
            "probe": "dipstream.runtime.probe:ProbeConfig",
            "export": "dipstream.engine.export:ExportConfig",
            "serve": "dipstream.server:ServeConfig",
            "chat": "dipstream.chat_session:ChatConfig"}


def config_class(command: str):
    import importlib

    module, name = _CONFIGS[command].split(":")
    return getattr(importlib.import_module(module), name)


# name: (function, help, description or None, positional argument (name, help) or None)
_COMMANDS = {
    "eval": (cmd_eval, "perplexity and measured density of a method at a density", None, None),
    "simulate": (cmd_simulate, "perplexity plus simulated tokens/s, memory and hit rate", None, None),
    "finetune": (cmd_finetune, "recover accuracy with LoRA, fine-tune dReLU, or train predictors",
                 "Train LoRA adapters for a sparse method (cross-entropy or distillation from the dense "
                 "model), a dReLU/ReLUfied model, or predictors (--method predictor). Writes an adapter "
                 "folder (--out) for `eval`/`simulate`/`generate --adapter`; re-running resumes. "
                 "Perplexity is measured on --tokens eval tokens (default 8176).", None),
    "sweep": (cmd_sweep, "run (or resume) the cross product of a YAML sweep config", None,
              ("config", "sweep config (YAML): see dipstream/experiments/sweep_config.py")),
    "lm-eval": (cmd_lm_eval, "downstream accuracy of the sparse model with lm-evaluation-harness",
                None, None),
    "report": (cmd_report, "figures and a Markdown report from a sweep's results folder", None,
               ("results", "results folder written by `dipstream sweep` (or its results.jsonl)")),
    "generate": (cmd_generate, "stream generated text with the real (sparse, optionally offloaded) "
                 "MLP and report tokens/s", None, None),
    "export": (cmd_export, "write a model's file for the lean engine (done on first use by `generate`; do it "
               "beforehand for memory-capped runs)", None, None),
    "probe": (cmd_probe, "measure RAM, disk and CPU GEMV speed; write a hardware file for "
              "`dipstream simulate`", None, None),
    "serve": (cmd_serve, "an OpenAI-compatible HTTP server on the engine (/v1/completions, /v1/chat/completions)",
              None, None),
    "chat": (cmd_chat, "talk to a model in the terminal (its chat template, streamed answers, speed shown)", None,
             None),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `dipstream` parser; with `only`, the options of that subcommand alone are added (the
    others are listed without importing their configs)."""
    parser = argparse.ArgumentParser(prog="dipstream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dipstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text, description, positional) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        if positional:
            p.add_argument(positional[0], help=positional[1])
        if only is None or only == name:
            add_dataclass_args(p, config_class(name))
        p.set_defaults(func=func)
    sub.add_parser("models", help="list built-in models").set_defaults(func=cmd_models)
    sub.add_parser("methods", help="list sparsity methods and what they read").set_defaults(func=cmd_methods)
    return parser


@contextmanager
def stop_on_sigterm():
    """SIGTERM stops every command the way Ctrl-C does (KeyboardInterrupt): temporary files removed,
    finished results kept, exit 130 with one line."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in _COMMANDS or command in ("models", "methods") else "")
    ns = parser.parse_args(argv)
    ns.argv = argv
    try:
        with stop_on_sigterm():
            return ns.func(ns)
    except DipstreamError as exc:
        print(f"dipstream: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dipstream: interrupted; what was finished is kept, nothing half-written (run the command again to "
              "go on)", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, ... outside the checked paths
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"dipstream: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback only on request
        if os.environ.get("DIPSTREAM_DEBUG"):
            raise
        print(f"dipstream: error: internal error ({type(exc).__name__}: {_one_line(str(exc))[:200]}); "
              "run again with DIPSTREAM_DEBUG=1 for the traceback and please report it", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
