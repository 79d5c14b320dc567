"""`dipstream probe`: a small real probe writes a hardware file the simulator loads; the flash
fit is hand-checked; bad input gets one-line errors."""

import pytest

from dipstream.cli.main import main
from dipstream.runtime.probe import ProbeConfig, run_probe
from dipstream.simulator.hardware import fit_flash
from dipstream.simulator import load_hardware

SMALL = dict(size="4MB", chunks="4096,12288", seq_chunk=1 << 18, io_threads=2, reads=64,
             ram_mb=16, repeats=1, gemv_shape="256x4096")


def test_fit_flash_hand_worked():
    # seq 1 GB/s; 10 kB reads: 60 us at 1 in flight (10 us transfer -> 50 us latency),
    # 20 us with 8 in flight (10 us beyond transfer) -> queue depth round(50 / 10) = 5
    disk = {"seq_bw": 1e9, "random": {10000: {"s_per_read_qd1": 60e-6, "s_per_read_qd8": 20e-6}}}
    fit = fit_flash(disk, 8)
    assert fit["flash_bw"] == 1e9 and fit["flash_queue_depth"] == 5
    assert fit["latency_qd1_s"] == pytest.approx(50e-6)
    assert fit["flash_read_latency_s"] / fit["flash_queue_depth"] == pytest.approx(10e-6)


def test_probe_writes_a_hardware_file_the_simulator_accepts(tmp_path):
    out = tmp_path / "hw.yaml"
    res = run_probe(ProbeConfig(out=str(out), dir=str(tmp_path), json=str(tmp_path / "p.json"),
                                **SMALL), log=lambda m: None)
    hw = load_hardware(out)
    assert hw.dram_bw > 1e8 and hw.flash_bw > 1e6 and hw.compute_flops > 1e7
    assert hw.flash_queue_depth >= 1 and hw.flash_read_latency_s > 0
    assert hw.bundle and hw.coalesce and hw.overlap and set(hw.bits.values()) == {32}
    assert set(res["disk"]["random"]) == {4096, 12288}
    assert "measured by `dipstream probe`" in out.read_text()
    assert not list(tmp_path.glob("dipstream-probe-*.bin"))  # test file removed
    # measuring an existing file instead (read only)
    f = tmp_path / "data.bin"
    f.write_bytes(bytes(2 << 20))
    res2 = run_probe(ProbeConfig(out=str(tmp_path / "hw2.yaml"), file=str(f), **SMALL),
                     log=lambda m: None)
    assert res2["disk"]["file_bytes"] == 2 << 20 and f.exists()


@pytest.mark.parametrize("extra,message", [
    (["--chunks", "1000"], "multiples of 512"),
    (["--size", "100kB"], "too small"),
    (["--file", "/nonexistent/x.bin"], "does not exist"),
    (["--gemv-shape", "big"], "ROWSxCOLS"),
])
def test_probe_cli_errors(tmp_path, capsys, extra, message):
    rc = main(["probe", "--out", str(tmp_path / "hw.yaml"), "--dir", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("dipstream: error:") and message in err[-1]
