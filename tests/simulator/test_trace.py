import os

import numpy as np
import pytest

from dipstream.simulator import (Hook, MaskTrace, ModelShape, check_trace_matches, get_shape,
                                 hook_specs, load_trace, synthetic_trace)

SMALL = ModelShape(2, 12, 20, 50, 4, 2)  # n_units 12 and 20: not multiples of 8


def test_round_trip_exact(tmp_path):
    tr = synthetic_trace(SMALL, "dip", 0.4, n_tokens=13, seq_len=5, prompt_len=2, seed=0)
    tr.metadata["note"] = np.int64(7)  # numpy scalars are stored as plain JSON
    p = tmp_path / "t.npz"
    tr.save(p)
    assert os.listdir(tmp_path) == ["t.npz"]  # atomic write left no temporary file
    back = load_trace(p)
    assert back.metadata == {**tr.metadata, "note": 7}
    assert back.seq_starts.tolist() == [0, 5, 10] and back.prompt_len.tolist() == [2, 2, 2]
    for a, b in zip(tr.hooks, back.hooks):
        assert (a.name, a.kind, a.n_units, a.unit_weights) == (b.name, b.kind, b.n_units,
                                                               b.unit_weights)
        assert b.masks.dtype == bool and np.array_equal(a.masks, b.masks)


def test_hook_specs():
    s = hook_specs(SMALL, "dip")
    assert [(h.name, h.kind, h.n_units, h.unit_weights) for h in s[:2]] == [
        ("layers.0.in", "in", 12, 40), ("layers.0.out", "out", 20, 12)]
    assert hook_specs(SMALL, "neuron")[1].unit_weights == 36


def test_mismatched_shapes_raise(tmp_path):
    tr = synthetic_trace(SMALL, "dip", 0.4, n_tokens=4)
    other = ModelShape(2, 12, 24, 50, 4, 2)
    # the message names the model the trace came from and the one it is replayed for
    with pytest.raises(ValueError, match=r"trace was recorded for d_ff=20 \(model synthetic\) but model "
                                         "other has d_ff=24"):
        check_trace_matches(tr, other, "other")
    tr.metadata = {}
    with pytest.raises(ValueError, match="trace was recorded for d_ff=20 but the given model has "
                                         "d_ff=24"):
        check_trace_matches(tr, other)
    with pytest.raises(ValueError, match="d_model=12 but model phi3-mini has d_model=3072"):
        check_trace_matches(tr, get_shape("phi3-mini"), "phi3-mini")


def test_bad_masks_raise(tmp_path):
    with pytest.raises(ValueError, match=r"masks have shape \(3, 5\), expected \(T=3, n_units=4\)"):
        MaskTrace([Hook("layers.0.out", "out", 4, 2, np.zeros((3, 5), bool))])
    with pytest.raises(ValueError, match="seq_starts"):
        MaskTrace([Hook("a", "dense", 4, 2, np.zeros((3, 4), bool))], seq_starts=[1])
    with pytest.raises(ValueError, match="prompt_len"):
        MaskTrace([Hook("a", "dense", 4, 2, np.zeros((3, 4), bool))], prompt_len=[4])
    # a file whose packed masks do not match the recorded shape
    tr = synthetic_trace(SMALL, "dip", 0.4, n_tokens=4)
    p = tmp_path / "t.npz"
    tr.save(p)
    z = dict(np.load(p))
    z["mask_1"] = z["mask_1"][:, :1]
    np.savez(p, **z)
    with pytest.raises(ValueError, match="layers.0.out masks are uint8"):
        load_trace(p)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"is not a mask trace \(not an .npz file\)"):
        load_trace(tmp_path / "junk.npz")
