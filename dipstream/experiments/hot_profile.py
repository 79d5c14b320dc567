"""The `hot` policy's unit frequencies, learned on other text (PowerInfer's offline profiling): the
same method and density run on the corpus's train split, counted per unit, saved once as an
artefact and reused. The evaluated text is never looked at; `hot-same-trace` (its own counts) is
kept only as a named upper bound."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from dipstream import __version__
from dipstream.errors import DipstreamError
from dipstream.paths import cache_root
from dipstream.simulator.policies import load_profile, save_profile
from dipstream.validation import private_dir


def profile_key(ev) -> dict:
    """What a profile depends on: model, method and its options, the train text and its length."""
    return {"v": __version__, "model": ev.model, "method": "dip" if ev.method == "dip-ca" else ev.method,
            "density": ev.density, "options": dataclasses.asdict(ev.options), "corpus": ev.corpus,
            "split": "train", "seq_len": ev.seq_len, "tokens": ev.calib_tokens, "dtype": ev.dtype,
            "adapter": ev.adapter}


def profile_path(ev) -> Path:
    """Where the profile of `ev` is kept ($DIPSTREAM_CACHE/profiles)."""
    key = hashlib.sha256(json.dumps(profile_key(ev), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "profiles" / f"{Path(ev.model).name}-{profile_key(ev)['method']}-{ev.density:g}-{key}.npz"


def hot_frequencies(ev, sim, shape, evaluate_and_record) -> tuple[dict, dict]:
    """({hook: unit counts}, row fields) for the `hot` policy: loaded, or computed once by running
    `ev`'s method (DIP for DIP-CA) over `ev.calib_tokens` tokens of the corpus's train split with
    `evaluate_and_record(ev, sim, shape, progress)` (simulate's, passed in: no import cycle)."""
    path = profile_path(ev)
    if not path.exists():
        from dipstream.io import folder_lock

        folder = private_dir(path.parent)
        with folder_lock(folder, "hot profile", wait=True):
            if not path.exists():  # another process may have made it while we waited
                train = dataclasses.replace(ev, method=profile_key(ev)["method"], split="train", text=None,
                                            tokens=ev.calib_tokens, json=None, save_thresholds=None)
                _, trace = evaluate_and_record(train, dataclasses.replace(sim, policy="lru"), shape, False)
                if trace is None:
                    raise DipstreamError(f"policy hot needs a method with masks; {ev.method} reads everything")
                save_profile(path, trace.frequencies(), {**profile_key(ev), "tokens_profiled": trace.n_tokens})
    freq, meta = load_profile(path)
    return freq, {"hot_profile": str(path), "hot_profile_tokens": meta.get("tokens_profiled"),
                  "hot_profile_text": f"{meta.get('corpus')} train split"}
