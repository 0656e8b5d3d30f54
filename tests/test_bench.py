"""The benchmark harness without timing anything: configs, the correctness gate, output."""

import json
import os

import pytest
import torch

from bench import cli, configs, harness, impls, report


def test_named_and_custom_configs():
    assert configs.parse("fastrnns") == configs.Config("fastrnns", 100, 64, 512, 512)
    custom = configs.parse("T7,B3,I5,H4,L2,bi,packed")
    assert (custom.T, custom.B, custom.I, custom.H, custom.layers, custom.bidirectional, custom.packed) == \
        (7, 3, 5, 4, 2, True, True)
    assert [c.name for c in configs.BASELINES] == ["fastrnns", "deep4", "bidir2", "latency_b1",
                                                   "small_b16_h128", "big"]
    for bad in ("T7,B3,I5", "T7,B3,I5,H4,X9", "T0,B3,I5,H4", "nonsense"):
        with pytest.raises(ValueError):
            configs.parse(bad)


def test_sweeps_vary_one_dimension():
    for kind, field in (("batch", "B"), ("hidden", "H"), ("seq", "T")):
        sweep = configs.sweep(kind, "cpu")
        values = [getattr(c, field) for c in sweep]
        assert len(set(values)) == len(values) > 2
        others = {(c.T, c.B, c.H) for c in sweep}
        assert len(others) == len(sweep)


def test_suite_plan_and_overrides():
    args = cli.build_parser().parse_args(["--configs", "cpu_small;T5,B2,I3,H4", "--cells", "GRU",
                                          "--dtypes", "float64"])
    config_list, cells, dtypes = cli.plan(args, "cpu")
    assert [c.name for c in config_list] == ["cpu_small", "custom"]
    assert cells == ["GRU"] and dtypes == [torch.float64]
    with pytest.raises(SystemExit):
        cli.plan(cli.build_parser().parse_args(["--cells", "TRANSFORMER"]), "cpu")


def _broken(base, cell, config, device, dtype):
    """torch.nn with its output off by 1%: must be refused, not timed."""
    run = impls.make_torch(base, cell, config, device, dtype)
    return lambda x, mode: run(x, mode) * 1.01


def test_correctness_gate_refuses_a_wrong_implementation(monkeypatch):
    monkeypatch.setitem(impls.IMPLEMENTATIONS, "broken", _broken)
    config = configs.parse("T6,B3,I4,H5")
    results = harness.run_case("GRU", config, torch.float32, "fwdbwd", ["torch", "rnnfused", "broken"], "cpu",
                               warmup=0, repeats=0)
    by_name = {r.impl: r for r in results}
    assert by_name["torch"].status == "ok" and by_name["rnnfused"].status == "ok"
    assert by_name["rnnfused"].max_error < 1e-5
    assert by_name["broken"].status.startswith("refused") and by_name["broken"].max_error > 1e-3
    assert by_name["broken"].ms is None and by_name["broken"].times_ms == []


def test_gate_covers_packed_input_and_skips_with_reasons():
    config = configs.parse("T6,B4,I4,H5,L2,bi,packed")
    results = harness.run_case("LSTM", config, torch.float64, "fwd", ["rnnfused", "torch", "torch_native", "flashrnn"],
                               "cpu", warmup=0, repeats=0)
    by_name = {r.impl: r for r in results}
    assert by_name["rnnfused"].status == "ok" and by_name["rnnfused"].max_error < 1e-9
    assert by_name["torch_native"].status.startswith("skipped")
    assert by_name["flashrnn"].status.startswith("skipped")


def test_a_failing_implementation_does_not_stop_the_run(monkeypatch):
    def explode(*args):
        raise RuntimeError("kernel build failed\nlong log")
    monkeypatch.setitem(impls.IMPLEMENTATIONS, "explode", explode)
    results = harness.run_case("RNN", configs.parse("T3,B2,I3,H3"), torch.float32, "fwd", ["explode", "torch"],
                               "cpu", warmup=0, repeats=0)
    assert results[0].status == "failed: RuntimeError: kernel build failed"
    assert results[1].status == "ok"


def test_results_are_written_and_tabulated(tmp_path):
    rows = [harness.Result("cfg", "T1 B2 I3 H4", "LSTM", "float32", "fwd", "torch", ms=2.0, ratio=1.0),
            harness.Result("cfg", "T1 B2 I3 H4", "LSTM", "float32", "fwd", "rnnfused", ms=1.0, ratio=0.5,
                           max_error=1e-7, times_ms=[1.0, 1.0]),
            harness.Result("cfg", "T1 B2 I3 H4", "LSTM", "float32", "fwd", "flashrnn", status="skipped: absent")]
    report.write(rows, str(tmp_path), {"device": "test"})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"] == {"device": "test"}
    assert [r["impl"] for r in data["results"]] == ["torch", "rnnfused", "flashrnn"]
    assert data["results"][1]["times_ms"] == [1.0, 1.0]
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == report.FIELDS and len(csv_lines) == 4
    text = report.table(rows)
    assert "rnnfused" in text and "0.50" in text and "flashrnn skipped: absent (1 cases)" in text


def test_plot_of_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [harness.Result(f"batch{b}", f"T50 B{b} I128 H128", "GRU", "float32", "fwd", "rnnfused", ms=1.0,
                           ratio=r) for b, r in ((1, 0.5), (4, 0.8), (16, 1.2))]
    path = report.plot(rows, str(tmp_path), "B", "test")
    assert path and os.path.getsize(path) > 0


def test_plot_of_cases(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [harness.Result("cfg", "T1 B2 I3 H4", cell, "float32", "fwd", "rnnfused", ms=1.0, ratio=r)
            for cell, r in (("LSTM", 1.3), ("GRU", 0.6))]
    path = report.plot_cases(rows, str(tmp_path), "test")
    assert path and os.path.getsize(path) > 0
    assert report.plot_cases(rows[:0], str(tmp_path), "empty") is None


def test_floor_times_the_products_next_to_both_layers(capsys):
    from bench import floor

    assert floor.main(["--configs", "T4,B2,I3,H5", "--rounds", "1", "--threads", str(torch.get_num_threads())]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("T4 B2 I3 H5")]
    assert [row[4] for row in rows] == ["fwd", "fwd+bwd"]
    assert all(float(value) > 0 for row in rows for value in row[5:])
    with pytest.raises(SystemExit):  # a stack's products are not one layer's
        floor.main(["--configs", "T4,B2,I3,H5,L2", "--rounds", "1"])
