"""A sweep's results folder: one tidy table (JSONL, the source of truth, plus a CSV export),
the model runs whose masks are replayed, and a manifest saying which format wrote it.

    RESULTS/sweep.json          {"format": "dipstream-results/1", "dipstream": "<version>"}
    RESULTS/results.jsonl       one flat row per finished run (appended + fsynced, single writer)
    RESULTS/results.csv         the same table as CSV (lists as JSON), rewritten atomically
    RESULTS/model_runs/K.json   a model run's evaluation row (K = its model-run key)
    RESULTS/traces/K.npz        its bit-packed mask trace (see dipstream.simulator.trace)

A crash can at worst leave a torn last line in results.jsonl: readers skip it and the next
sweep cuts it off before appending, so the run is simply done again.
"""

from __future__ import annotations

import csv
import io
import json
import os
from contextlib import ExitStack
from pathlib import Path

from dipstream import __version__
from dipstream.errors import DipstreamError
from dipstream.io import (
    append_jsonl,
    clean_temps,
    folder_lock,
    read_jsonl,
    refuse_links,
    write_bytes_atomic,
    write_json_atomic,
)
from dipstream.simulator import load_trace

FORMAT = "dipstream-results/1"  # bump when rows or the folder layout change incompatibly
ROWS, CSV_NAME, MANIFEST = "results.jsonl", "results.csv", "sweep.json"


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted columns ({"a": {"b": 1}} -> {"a.b": 1}); lists stay."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_manifest(root: Path, create: bool) -> dict:
    """The folder's manifest; a one-line error when another results format wrote it."""
    path = root / MANIFEST
    if path.exists():
        try:
            man = json.loads(path.read_text())
        except ValueError:
            raise DipstreamError(f"{path} is not valid JSON; is '{root}' a dipstream results "
                                 "folder?") from None
        if not isinstance(man, dict):
            raise DipstreamError(f"{path} is not a results manifest (a JSON object); is '{root}' a dipstream "
                                 "results folder?")
        if man.get("format") != FORMAT:
            raise DipstreamError(
                f"results folder '{root}' was written by dipstream {man.get('dipstream', '?')} "
                f"(format {man.get('format')}), which this dipstream {__version__} ({FORMAT}) cannot "
                "read or extend; use a new --results folder (or that dipstream version)")
        return man
    if not create:
        raise DipstreamError(f"'{root}' is not a dipstream results folder (no {MANIFEST}); give the "
                             "folder a `dipstream sweep` wrote")
    if root.exists() and any(p.name != ".lock" for p in root.iterdir()):
        raise DipstreamError(f"'{root}' is not empty and holds no {MANIFEST}: not a dipstream results "
                             "folder; give an empty or new folder to --results")
    man = {"format": FORMAT, "dipstream": __version__}
    write_json_atomic(path, man)
    return man


def repair_tail(path: Path) -> bool:
    """Cut a torn last line (a crash mid-append) so the next append starts on a fresh line."""
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with path.open("rb+") as fh:
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())
    return True


class ResultsStore:
    """Single-writer access to a results folder (an exclusive lock keeps a second sweep out)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self._lock = None
        self.damaged: list[str] = []  # model runs whose stored trace could not be read

    def __enter__(self):
        self._lock = ExitStack()  # io.folder_lock: no links in the folder, one sweep writing at a time
        self._lock.enter_context(folder_lock(self.root, "sweep"))
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self) -> None:
        check_manifest(self.root, create=True)
        for sub in ("model_runs", "traces"):
            (self.root / sub).mkdir(exist_ok=True)
            refuse_links(self.root / sub)
        # writes cut short by a killed sweep (we hold the lock: nobody else is writing)
        clean_temps(self.root, (CSV_NAME, MANIFEST))
        clean_temps(self.root / "model_runs", patterns=(".*.json.*",))
        clean_temps(self.root / "traces", patterns=(".*.npz.*",))
        gi = self.root / ".gitignore"
        if not gi.exists():
            gi.write_text("# mask traces are large and can be recomputed\ntraces/\n.lock\n")
        self.repaired = repair_tail(self.root / ROWS)

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def note_config(self, config: str | Path, description: str | None) -> None:
        """Record which sweep config wrote into this folder (for the report's provenance)."""
        man = check_manifest(self.root, create=False)
        entry = {"config": str(config), "description": description}
        if entry not in man.setdefault("configs", []):
            man["configs"].append(entry)
            write_json_atomic(self.root / MANIFEST, man)

    def rows(self) -> list[dict]:
        return [r for r in read_jsonl(self.root / ROWS) if isinstance(r, dict) and "key" in r]

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.rows()}

    def append(self, row: dict) -> None:
        append_jsonl(self.root / ROWS, row)

    def trace_path(self, model_run: str) -> Path:
        return self.root / "traces" / f"{model_run}.npz"

    def model_run(self, model_run: str, check_trace: bool = False) -> dict | None:
        """The stored evaluation row of a finished model run (None when missing or incomplete;
        with `check_trace`, also when its trace does not load, which `damaged` then lists)."""
        path = self.root / "model_runs" / f"{model_run}.json"
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
            assert isinstance(rec, dict) and isinstance(rec.get("eval"), dict)
        except (ValueError, AssertionError):
            return None
        if rec.get("has_trace"):
            trace = self.trace_path(model_run)
            if not trace.exists():
                return None
            if check_trace:

                try:
                    load_trace(trace)
                except ValueError:
                    self.damaged.append(model_run)
                    return None
        return rec

    def save_model_run(self, model_run: str, eval_row: dict, trace_bytes: bytes | None,
                       seconds: float) -> dict:
        """Trace first, then the record that marks the model run finished (both atomic)."""
        if trace_bytes is not None:
            write_bytes_atomic(self.trace_path(model_run), trace_bytes)
        rec = {"model_run": model_run, "has_trace": trace_bytes is not None, "seconds": seconds,
               "eval": eval_row}
        write_json_atomic(self.root / "model_runs" / f"{model_run}.json", rec)
        return rec

    def export_csv(self) -> Path:
        return export_csv(self.rows(), self.root / CSV_NAME)


def read_stored(root: Path) -> tuple[set, set]:
    """(finished run keys, stored model-run keys) of a results folder, read only."""
    done = {r["key"] for r in read_jsonl(root / ROWS) if isinstance(r, dict) and "key" in r}
    runs = {p.stem for p in (root / "model_runs").glob("*.json")} if (root / "model_runs").is_dir() else set()
    return done, runs


def export_csv(rows: list[dict], path: Path) -> Path:
    """Write rows as CSV (columns in order of first appearance; lists and dicts as JSON)."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    write_bytes_atomic(Path(path), buf.getvalue().encode())
    return Path(path)


def results_folder(path: str | Path) -> Path:
    """The results folder of `path`: a folder itself, or the folder holding a results.jsonl."""
    path = Path(path).expanduser()
    return path if path.is_dir() else path.parent


def load_results(path: str | Path) -> tuple[list[dict], dict]:
    """Rows of a results folder (or its results.jsonl), the latest row per configuration, and
    the folder's manifest ({} for a results.jsonl outside a results folder)."""
    path = Path(path).expanduser()
    root = results_folder(path)
    manifest = check_manifest(root, create=False) if path.is_dir() or (root / MANIFEST).exists() else {}
    if path.is_dir():
        path = path / ROWS
    if not path.exists():
        raise DipstreamError(f"no results at '{path}': run `dipstream sweep CONFIG.yaml` first")
    latest = {}
    for r in read_jsonl(path):
        if isinstance(r, dict) and "key" in r:
            latest[r.get("config_key", r["key"])] = r
    if not latest:
        raise DipstreamError(f"'{path}' holds no finished runs yet; run or resume the sweep first")
    return list(latest.values()), manifest
