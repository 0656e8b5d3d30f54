"""python -m bench.phases without a GPU run: it refuses where it cannot measure (no GPU, no
CUDA kernels, a build without RNNFUSED_PHASE_TIMING) and writes nothing; its arithmetic from
a launch's per-CTA record (clock64 cycles per phase, clock64 and %globaltimer at start and
end) to microseconds; the planner settings of each --tilings entry."""

import pytest
import torch

from bench import configs, phases
from bench.impls import kernel_setting
from rnnfused import _C
from rnnfused._ops import Cell


def test_the_bench_reports_every_phase_the_kernel_times():
    assert sorted(phases.STEP_PHASES + phases.LAUNCH_PHASES) == sorted(_C.phase_names)


@pytest.mark.skipif(phases.why_not() is None, reason="this machine can time phases")
def test_refuses_without_a_gpu_or_the_timer(tmp_path, capsys):
    out = tmp_path / "phases"
    assert phases.main(["--out", str(out), "--repeats", "1"]) == 2
    assert "refusing to run: " + phases.why_not() in capsys.readouterr().err
    assert not out.exists()


def test_summary_converts_cycles_with_each_ctas_own_clock():
    # CTA 0: 1000 cycles in 2000 ns (2 ns per cycle); CTA 1: 1000 cycles in 1000 ns.
    # cycles: begin, exchange, mma, cell, stores, window, barrier, end
    record = {"launches": 1, "steps": 4, "phases_per_step": 1, "ctas": [
        {"cycles": [100, 200, 120, 80, 40, 20, 400, 60], "clock": (5000, 6000), "ns": (10_000, 12_000)},
        {"cycles": [100, 400, 120, 80, 40, 20, 200, 60], "clock": (7000, 8000), "ns": (10_000, 11_000)},
    ]}
    summary = phases.summarize(record)
    assert summary["begin"] == pytest.approx((0.2 + 0.1) / 2)               # us per launch
    assert summary["exchange"] == pytest.approx((0.4 / 4 + 0.4 / 4) / 2)    # us per step
    assert summary["barrier"] == pytest.approx((0.8 / 4 + 0.2 / 4) / 2)
    assert summary["kernel"] == pytest.approx(1.5)
    assert summary["ns_per_cycle"] == pytest.approx(1.5)


def test_summary_refuses_a_record_that_is_not_a_timed_launch():
    with pytest.raises(ValueError):
        phases.summarize({"launches": 0, "steps": 0, "phases_per_step": 0, "ctas": []})
    with pytest.raises(ValueError, match="not a timed launch"):
        phases.summarize({"launches": 1, "steps": 2, "phases_per_step": 1,
                          "ctas": [{"cycles": [0] * 8, "clock": (0, 0), "ns": (0, 0)}]})


@pytest.mark.parametrize("tiling,expect", [
    ("model", "the cost model's cheapest"), ("shared_w", "the cost model's cheapest"),
    ("portable", "the cost model's cheapest"),
    ("grid", "the cost model's cheapest"), ("spread", "units spread over the SMs"),
    ("one_cta", "each CTA has all the units of its rows"), ("16x32", "forced by RNNFUSED_PERSISTENT_TILING=16x32")])
def test_each_tiling_sets_what_the_planner_reads(tiling, expect):
    config = configs.NAMED["small_b16_h128"]
    with kernel_setting("simulate", **phases.tiling_settings(tiling, config)):
        plan = _C.layer_plan(int(Cell.LSTM), config.T, config.H, config.B, torch.float16, "cpu")
    assert plan["kernel"] == "persistent (host simulation)" and expect in plan["reason"], plan["reason"]
    assert (plan["cluster"] == 0) == (tiling in ("grid", "spread", "one_cta")), plan["reason"]
    assert plan["cluster"] <= (8 if tiling == "portable" else 16), plan["reason"]
    if tiling in ("model", "shared_w"):  # 4 fragments of W a warp: held unless told not to
        assert (plan["held_fwd"] > 0) == (tiling == "model"), plan["reason"]


def test_a_tiling_is_named_or_rows_by_units():
    with pytest.raises(ValueError, match="model, shared_w, portable, grid, spread, one_cta or ROWSxUNITS"):
        phases.tiling_settings("16by32", configs.NAMED["small_b16_h128"])
