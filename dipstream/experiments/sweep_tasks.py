"""The two kinds of work a sweep sends to its executor (top-level functions, so they pickle):
a model run (evaluate once, record every token's masks) and a replay (simulate those masks on
one device). Both return plain data; only the sweep's own process writes the results folder.
"""

from __future__ import annotations

import io
import os
import signal
import tempfile
import time
from pathlib import Path

from dipstream.errors import user_errors
from dipstream.experiments.simulate import evaluate_and_record, simulate_trace
from dipstream.experiments.sweep_config import run_config
from dipstream.models.loading import shape_of
from dipstream.simulator import ModelShape, load_trace, save_trace

KILL_ENV = "DIPSTREAM_SWEEP_KILL_TASK"  # fault injection for tests: the N-th task kills itself


def _fault_injection(ordinal: int) -> None:
    """With $DIPSTREAM_SWEEP_KILL_TASK=N, the process that starts task N dies with SIGKILL (used by
    the tests to crash a sweep mid-way, exactly like kill -9)."""
    if os.environ.get(KILL_ENV) == str(ordinal):
        os.kill(os.getpid(), signal.SIGKILL)


def set_threads(threads: int | None) -> None:
    """torch threads of this worker process, set by the task itself so every executor (pool,
    Ray) gets them; replays run no torch."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def record_task(params: dict, ordinal: int, threads: int | None = None):
    """Evaluate one model run with a mask recorder (and, for closed-loop methods, the live
    simulated caches of `params`' device). Returns (evaluation row, trace .npz bytes or None
    for a run without masks, wall seconds)."""
    _fault_injection(ordinal)
    set_threads(threads)

    start = time.perf_counter()
    cfg = run_config(params)
    row, trace = evaluate_and_record(cfg.eval, cfg.sim, shape_of(cfg.eval.model), progress=False)
    data = None
    if trace is not None:
        with tempfile.TemporaryDirectory(prefix="dipstream-trace-") as tmp:
            path = Path(tmp) / "trace.npz"
            save_trace(trace, path)
            data = path.read_bytes()
    return row, data, time.perf_counter() - start


record_task.runs_model = True  # a Ray cluster with GPUs gives it one


def replay_task(trace, params: dict, shape: dict, ordinal: int):
    """Simulate one device on a recorded trace (a path, the .npz bytes, or None for a dense run).
    Returns (figures, wall seconds)."""
    _fault_injection(ordinal)

    start = time.perf_counter()
    cfg = run_config(params)
    if trace is not None:
        with user_errors():
            trace = load_trace(io.BytesIO(trace) if isinstance(trace, bytes) else trace)
    figures = simulate_trace(trace, ModelShape.from_dict(shape), cfg.sim, cfg.eval.seq_len, cfg.eval)
    return figures, time.perf_counter() - start
