"""A model folder cannot be turned against its user: every field of the manifest mutated (and bytes
of model.bin and of the lean tokenizer) gives a one-line refusal or the unchanged result, never a
native crash and never a silently different output. Forged mutations (the manifest re-signed, as a
hostile folder would be) give a refusal or a run, never a crash or an exception that is not a
one-line refusal: every field is checked before any native call. The mutations run in one child
process (a native crash there fails the test and names the case)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

CASE_TOKENS = [3, 17, 42, 5]


def leaves(obj, path=()):
    """(path, value) of every leaf of a JSON object (long lists: their first two entries and the list)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list) and obj and not all(isinstance(v, (int, float)) for v in obj):
        for i, v in enumerate(obj[:2]):
            yield from leaves(v, path + (i,))
    else:
        if isinstance(obj, list):
            for i in range(min(2, len(obj))):
                yield path + (i,), obj[i]
        yield path, obj


def mutations(value):
    if isinstance(value, bool):
        return [not value, 1, None]
    if isinstance(value, int):
        return [value + 1, value - 1, 0, -1, 1 << 40, value * 2, 1.5, "7", None, True]
    if isinstance(value, float):
        return [value * 2, -value, 0.0, math.nan, math.inf, "x", None]
    if isinstance(value, str):
        return ["", "x", "int4", "q6_k", "q4_k_rows", "llama", "gemma3_text", value + "x", 3, None]
    if isinstance(value, list):
        return [[], value[:-1], value + value[-1:], None]
    return [0, "x", [], {}]


def put(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def tokens_of(directory: Path) -> list:
    """Greedy tokens of the model in `directory` after CASE_TOKENS (logits rounded: the verdict)."""
    from dipstream.engine.mlp import MaskChooser, RamMLP
    from dipstream.engine.model import LeanModel
    from dipstream.engine.modelfile import read_manifest
    from dipstream.engine.text import LeanTokenizer
    from dipstream.sparsity.decoding import decode_rule

    m = read_manifest(directory)
    ids = LeanTokenizer.load(directory).encode("hello world")
    lm = LeanModel(directory, m, 16, verify="auto")
    try:
        lm.mlp = RamMLP(lm, MaskChooser(decode_rule("dense"), [lm.d] * lm.L, [lm.D] * lm.L))
        out = list(ids)
        for pos, tok in enumerate(CASE_TOKENS):
            logits = lm.forward(tok, pos)
            out.append(int(np.argmax(logits)))
            out.append(round(float(logits.max()), 3))
        return out
    finally:
        lm.close()


def child(src: str, work: str) -> int:
    """Every case on a copy of the folder `src` in `work`; prints one verdict line per case."""
    from dipstream.engine.modelfile import manifest_digest
    from dipstream.errors import DipstreamError

    src, work = Path(src), Path(work)
    ref = tokens_of(src)
    manifest = json.loads((src / "model.json").read_text())
    cases = [(kind, p, v) for kind in ("manifest", "forged") for p, old in leaves(manifest) for v in mutations(old)
             if p != ("manifest_sha256",) or kind == "manifest"]
    rng = np.random.default_rng(0)
    size = (src / "model.bin").stat().st_size
    cases += [("model.bin", int(pos), None) for pos in rng.integers(0, size, 24)]
    cases += [("tokenizer", "random", None), ("tokenizer", "truncated", None)]
    bad = 0
    for i, (kind, where, value) in enumerate(cases):
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(src, work)
        label = f"{kind} {where} = {value!r}"
        print(f"CASE {i} {label}", flush=True)
        if kind in ("manifest", "forged"):
            m = copy.deepcopy(manifest)
            put(m, where, value)
            if kind == "forged":
                m["manifest_sha256"] = manifest_digest(m)
            (work / "model.json").write_text(json.dumps(m))
        elif kind == "model.bin":
            with open(work / "model.bin", "r+b") as f:
                f.seek(where)
                b = f.read(1)
                f.seek(where)
                f.write(bytes([b[0] ^ 0x5A]))
        else:
            lean = work / "tokenizer_lean.npz"
            data = lean.read_bytes()
            lean.write_bytes(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes() if where == "random"
                             else data[:len(data) // 2])
        try:
            got = tokens_of(work)
        except DipstreamError as e:
            verdict = "refused" if "\n" not in str(e) and str(e) else "MULTILINE"
        except Exception as e:  # noqa: BLE001 - anything else is a defect the test reports
            verdict = f"EXCEPTION {type(e).__name__}: {e}"
        else:
            verdict = "same" if got == ref else "ran" if kind == "forged" else f"SILENT {got} != {ref}"
        bad += verdict not in ("refused", "same", "ran")
        print(f"VERDICT {i} {verdict}", flush=True)
    print(f"DONE {len(cases)} {bad}", flush=True)
    return 0


def test_every_manifest_field_and_random_bytes(tiny_checkpoint, tmp_path):
    from dipstream.engine.export import export_checkpoint

    export_checkpoint(tiny_checkpoint, tmp_path / "src", "tiny", "int4")  # headers: scales and offsets
    assert (tmp_path / "src" / "tokenizer_lean.npz").is_file()
    r = subprocess.run([sys.executable, "-m", "tests.test_modelfile_fuzz", str(tmp_path / "src"),
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parents[1])
    lines = r.stdout.splitlines()
    last_case = next((ln for ln in reversed(lines) if ln.startswith("CASE")), "")
    assert r.returncode == 0, f"child died ({r.returncode}) at {last_case}: {r.stderr[-2000:]}"
    done = [ln for ln in lines if ln.startswith("DONE")]
    assert done, r.stdout[-2000:]
    n, bad = map(int, done[0].split()[1:])
    cases = {ln.split()[1]: ln.split(" ", 2)[2] for ln in lines if ln.startswith("CASE")}
    failures = [f"{cases[ln.split()[1]]}: {ln.split(' ', 2)[2]}" for ln in lines
                if ln.startswith("VERDICT") and ln.split()[2] not in ("refused", "same", "ran")]
    assert n > 300 and bad == 0, "\n".join(failures[:30])
    refused = sum(1 for ln in lines if ln.startswith("VERDICT") and ln.split()[2] == "refused")
    assert refused > n // 2  # most mutations matter, and each was caught


if __name__ == "__main__":
    sys.exit(child(sys.argv[1], sys.argv[2]))
