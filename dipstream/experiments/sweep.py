"""`dipstream sweep CONFIG.yaml`: every run of a cross product, resumable, into one tidy table.

Each run is keyed by a hash of its fully resolved configuration (every field, the resolved
hardware) and the package version; a finished run is one appended, fsynced JSONL row, so a
re-run skips it and a crash loses nothing finished. Runs share model runs: the model is
evaluated once per model x method x density x method options (x evaluation settings), its
per-token masks are stored as a bit-packed trace, and every hardware / DRAM / policy setting
replays that trace in the simulator (perplexity comes from the model run). Closed-loop methods
(DIP-CA) choose their masks from the live simulated cache, so their masks depend on the cache
configuration (per-layer capacities, set by DRAM size, precision and the static layers, and the
policy): they get one model run per cache configuration, replayed only across settings that
change bandwidths, latencies or overlap.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path

from dipstream import __version__
from dipstream.errors import DipstreamError, Interrupted, did_you_mean
from dipstream.experiments import sweep_tasks as tasks
from dipstream.experiments.configs import SweepOptions
from dipstream.experiments.executors import WorkerDied, make_executor
from dipstream.experiments.results_store import (
    ResultsStore,
    check_manifest,
    flatten,
    read_stored,
)
from dipstream.experiments.sweep_config import (
    InvalidRun,
    Run,
    load_sweep,
    resolve,
    run_fields,
)
from dipstream.simulator import ModelShape
from dipstream.sparsity import METHODS
from dipstream.validation import at_least, output_dir


def plan(config_path: str | Path) -> tuple[dict, list[Run], list[tuple[dict, str]]]:
    """(config, resolved runs, [(given run, why it was left out)]) of a sweep config."""

    raw, given = load_sweep(config_path)
    runs, skipped, shapes, hardwares, seen = [], [], {}, {}, set()
    default_method = run_fields()["method"][2]
    for g in given:
        method = g.get("method", default_method)
        if method not in METHODS:
            hint = did_you_mean(method, METHODS) or f"use one of {', '.join(METHODS)}"
            raise DipstreamError(f"{Path(config_path).name}: unknown method '{method}'; {hint}")
        try:
            run = resolve(g, shapes, hardwares)
        except InvalidRun as exc:
            skipped.append((g, str(exc)))
            continue
        except DipstreamError as exc:
            raise DipstreamError(f"{Path(config_path).name}: {exc}") from None
        if run.key not in seen:
            seen.add(run.key)
            runs.append(run)
    if not runs:
        raise DipstreamError(f"{Path(config_path).name}: none of its {len(given)} runs is valid "
                             f"(first: {skipped[0][1]})")
    return raw, runs, skipped


class _Eta:
    """Remaining time from the measured mean duration of each kind of task (priors until then)."""

    PRIOR = {"record": 20.0, "record-closed": 30.0, "replay": 2.0}

    def __init__(self, jobs: int):
        self.jobs, self.sum, self.n = jobs, {}, {}

    def add(self, kind: str, seconds: float) -> None:
        self.sum[kind] = self.sum.get(kind, 0.0) + seconds
        self.n[kind] = self.n.get(kind, 0) + 1

    def mean(self, kind: str) -> float:
        return self.sum[kind] / self.n[kind] if self.n.get(kind) else self.PRIOR[kind]

    def text(self, remaining: dict) -> str:
        s = sum(self.mean(k) * n for k, n in remaining.items()) / self.jobs
        return f"eta {int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else \
            f"eta {int(s // 60)}m{int(s % 60):02d}s"


def make_row(run: Run, rec: dict, figures: dict, shared: bool, replay_s: float) -> dict:
    """One tidy row: identity, the run's config (config.*), resolved hardware (hw.*), the model
    run's evaluation figures and the simulated figures."""

    model_bytes = ModelShape.from_dict(run.shape).weight_bytes(run.hardware["bits"])
    return {"key": run.key, "config_key": run.config_key, "model_run": run.model_run,
            "dipstream": __version__, "closed_loop": run.closed_loop, "trace_shared": shared,
            **flatten(rec["eval"]), **flatten(figures), "model_bytes": model_bytes,
            "dram_fraction": figures["dram_bytes"] / model_bytes,
            **{f"config.{k}": v for k, v in run.params.items()},
            **{f"hw.{k}": v for k, v in flatten(run.hardware).items()},
            "model_run_seconds": rec.get("seconds"), "replay_seconds": replay_s}


def _dry_run(runs: list[Run], results: Path) -> dict:
    """What is left to do, read from an existing results folder without writing anything."""

    done, stored = set(), {}
    if (results / "sweep.json").exists():
        check_manifest(results, create=False)
        done, stored = read_stored(results)
    pending = [r for r in runs if r.key not in done]
    groups: dict[str, list[Run]] = {}
    for r in pending:
        groups.setdefault(r.model_run, []).append(r)
    need = [mk for mk in groups if mk not in stored]
    print(f"{len(runs)} runs: {len(runs) - len(pending)} done before, {len(pending)} to do "
          f"({len(need)} model runs to evaluate) -> {results} (dry run: nothing written)", file=sys.stderr)
    for mk, g in groups.items():
        print(f"model run {mk} ({'stored' if mk in stored else 'to evaluate'}): "
              + "; ".join(r.label() for r in g))
    return {"runs": len(runs), "done_before": len(runs) - len(pending), "finished": 0, "failed": 0,
            "model_runs": 0, "results": str(results), "dry_run": True}


def run_sweep(config_path: str | Path, opts: SweepOptions) -> dict:
    """Run (or resume) a sweep; returns counts {runs, done_before, finished, failed, seconds}."""
    from tqdm.auto import tqdm



    start = time.perf_counter()
    at_least("jobs", opts.jobs, 1, optional=True)
    raw, runs, skipped = plan(config_path)
    given = opts.results or raw.get("results")
    if given is not None and not isinstance(given, str):
        raise DipstreamError(f"{Path(config_path).name}: `results` must be one folder name, got {given!r}")
    results = Path(given or Path("results") / Path(config_path).stem)
    output_dir("results", results)
    for why in dict.fromkeys(why for _, why in skipped):
        n = sum(1 for _, w in skipped if w == why)
        print(f"dipstream: skipping {n} run(s): {why}", file=sys.stderr)
    if opts.dry_run:
        return _dry_run(runs, results)
    with ResultsStore(results) as store:
        store.note_config(config_path, raw.get("description"))
        done = store.done_keys()
        pending = [r for r in runs if r.key not in done]
        groups: dict[str, list[Run]] = {}
        for r in runs:
            groups.setdefault(r.model_run, []).append(r)
        todo = {mk: [r for r in g if r.key not in done] for mk, g in groups.items()}
        todo = {mk: g for mk, g in todo.items() if g}
        stored = {mk: store.model_run(mk, check_trace=True) for mk in todo}
        for mk in store.damaged:
            print(f"dipstream: the stored trace of model run {mk} is damaged; recording it again",
                  file=sys.stderr)
        need = [mk for mk in todo if stored[mk] is None]
        print(f"{len(runs)} runs in {len(groups)} model runs: {len(runs) - len(pending)} done before, "
              f"{len(pending)} to do ({len(need)} model runs to evaluate) -> {results}", file=sys.stderr)
        if store.repaired:
            print("dipstream: cut a torn last line of results.jsonl (an interrupted write); that run "
                  "is done again", file=sys.stderr)
        summary = {"runs": len(runs), "done_before": len(runs) - len(pending), "finished": 0,
                   "failed": 0, "model_runs": 0, "results": str(results), "skipped": len(skipped)}
        if not pending:
            store.export_csv()
            return {**summary, "seconds": time.perf_counter() - start}
        ex = make_executor(opts.executor, opts.jobs, opts.ray_address, opts.gpus)
        eta = _Eta(ex.jobs)
        bar = tqdm(total=len(pending), unit="run", disable=not opts.progress, dynamic_ncols=True,
                   bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs "
                              "[{elapsed}{postfix}]", file=sys.stderr)
        replays, records = deque(), deque(need)
        handles, inflight, ordinal = {}, {}, 0
        left_replays = len(pending)
        n_failed = n_records = 0

        def enqueue_replays(mk):
            rec = stored[mk]
            if rec["has_trace"] and mk not in handles:
                handles[mk] = ex.share(store.trace_path(mk))
            replays.extend((mk, r) for r in todo[mk])

        for mk in todo:
            if stored[mk] is not None:
                enqueue_replays(mk)
        def worker_died(exc, label):
            return DipstreamError(
                f"a worker process died ({exc or 'killed or out of memory'}){label}; finished runs "
                f"are saved in {results}: run the same command again to resume (lower --jobs if "
                "memory ran out)")

        try:
            while replays or records or inflight:
                while len(inflight) < ex.jobs and (replays or records):
                    try:
                        if replays:
                            mk, r = replays.popleft()
                            h = ex.submit(tasks.replay_task, handles.get(mk), r.params, r.shape,
                                          ordinal)
                            inflight[h] = ("replay", mk, r)
                        else:
                            mk = records.popleft()
                            first = todo[mk][0]
                            h = ex.submit(tasks.record_task, first.params, ordinal, ex.threads)
                            inflight[h] = ("record-closed" if first.closed_loop else "record", mk,
                                           first)
                    except WorkerDied as exc:
                        raise worker_died(exc, "") from None
                    ordinal += 1
                remaining = {"replay": left_replays,
                             "record": sum(1 for mk in records if not todo[mk][0].closed_loop),
                             "record-closed": sum(1 for mk in records if todo[mk][0].closed_loop)}
                bar.set_postfix_str(eta.text(remaining))
                for h in ex.wait(inflight):
                    kind, mk, r = inflight.pop(h)
                    try:
                        res = ex.result(h)
                    except WorkerDied as exc:
                        raise worker_died(exc, f" while running {r.label()}") from None
                    except Exception as exc:  # one bad run must not stop the others
                        n_failed += len(todo[mk]) if kind != "replay" else 1
                        left_replays -= len(todo[mk]) if kind != "replay" else 1
                        bar.update(len(todo[mk]) if kind != "replay" else 1)
                        bar.write(f"dipstream: run failed ({type(exc).__name__}): {r.label()}: {exc}")
                        continue
                    if kind == "replay":
                        figures, secs = res
                        eta.add("replay", secs)
                        shared = len(groups[mk]) > 1
                        store.append(make_row(r, stored[mk], figures, shared, secs))
                        left_replays -= 1
                        summary["finished"] += 1
                        bar.update(1)
                    else:
                        row, data, secs = res
                        eta.add(kind, secs)
                        stored[mk] = store.save_model_run(mk, row, data, secs)
                        n_records += 1
                        bar.write(f"model run {r.label()}: perplexity {row['perplexity']:.3f}, "
                                  f"density {row['density_measured']:.3f} ({secs:.0f} s)")
                        enqueue_replays(mk)
        except KeyboardInterrupt:
            bar.close()
            raise Interrupted(f"interrupted; {summary['finished']} runs finished now are saved in "
                              f"{results}: run the same command again to resume") from None
        finally:
            bar.close()
            ex.close()
            store.export_csv()
    summary.update(failed=n_failed, model_runs=n_records, seconds=time.perf_counter() - start)
    return summary

