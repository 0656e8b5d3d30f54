"""The benchmark harness without timing anything: configs, the correctness gate, output."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import barrier, cli, configs, harness, impls, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.parametrize("argv, message", [
    (["--impls", "rnnfused,cudnn,torch"], "unknown implementation 'cudnn'; choose from rnnfused,"),
    (["--modes", "fwd,bwd"], "unknown mode 'bwd'; choose from fwd, fwdbwd"),
    (["--dtypes", "float8"], "unknown dtype 'float8'"),
    (["--configs", "T5,B2"], "lacks I, H"),
])
def test_unknown_names_are_rejected_before_anything_runs(argv, message, monkeypatch):
    monkeypatch.setattr(harness, "run_case", lambda *a, **k: pytest.fail("ran a case"))
    with pytest.raises(SystemExit) as raised:
        cli.main(argv + ["--device", "cpu"])
    assert message in str(raised.value)


def test_every_suite_plans_on_both_devices():
    for name in cli.SUITES:
        for device in ("cpu", "cuda"):
            config_list, cells, dtypes = cli.plan(cli.build_parser().parse_args(["--suite", name]), device)
            assert config_list and cells and dtypes
    assert "../" not in cli.build_parser().format_help()  # no paths outside the repository


def test_a_run_reports_progress_and_says_when_the_plot_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "_pyplot", lambda: None)  # as without matplotlib
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as without tqdm: one line per case
    assert cli.main(["--device", "cpu", "--configs", "T3,B2,I3,H4", "--cells", "GRU,RNN", "--modes", "fwd",
                     "--impls", "rnnfused,torch", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "[1/2] custom GRU float32 fwd" in err and "[2/2] custom RNN float32 fwd" in err
    assert "plot skipped: matplotlib is not installed (pip install matplotlib)" in out
    assert "x torch: median time / torch.nn's median time in the same case; below 1 is faster" in out
    assert (tmp_path / "results.csv").exists()


def test_make_clean_keeps_saved_results():
    done = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "rm" in done.stdout
    assert "results" not in done.stdout


def _broken(base, cell, config, device, dtype):
    """torch.nn with its output off by 1%: must be refused, not timed."""
    runner = impls.make_torch(base, cell, config, device, dtype)
    forward = runner.forward
    runner.forward = lambda x: forward(x) * 1.01
    return runner


def _wrong_weight_grad(base, cell, config, device, dtype):
    """torch.nn with the right output and input gradient but W_hh's gradient off by 1%."""
    runner = impls.make_torch(base, cell, config, device, dtype)
    runner.grads = lambda: {name: p.grad * 1.01 if name == "weight_hh_l0" else p.grad
                            for name, p in runner.module.named_parameters()}
    return runner


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


def test_correctness_gate_checks_weight_gradients(monkeypatch):
    monkeypatch.setitem(impls.IMPLEMENTATIONS, "wrong_dw", _wrong_weight_grad)
    results = harness.run_case("LSTM", configs.parse("T6,B3,I4,H5,L2"), torch.float32, "fwd",
                               ["torch", "wrong_dw"], "cpu", warmup=0, repeats=1)
    by_name = {r.impl: r for r in results}
    assert by_name["torch"].status == "ok" and by_name["torch"].ms is not None
    assert by_name["wrong_dw"].status.startswith("refused: weight_hh_l0 error")
    assert by_name["wrong_dw"].worst == "weight_hh_l0" and by_name["wrong_dw"].ms is None


def test_every_weight_gradient_is_compared():
    config = configs.parse("T5,B2,I3,H4,L2,bi")
    base = impls.base_module("GRU", config)
    x = harness.Inputs(config, "cpu", 1).next()
    reference = harness.reference_result(base, "GRU", config, "cpu", x)
    assert set(reference) == {"output", "input grad"} | {name for name, _ in base.named_parameters()}
    runner = impls.make_rnnfused(base, "GRU", config, "cpu", torch.float64)
    error, worst, ok, _ = harness.check(runner, reference, x, torch.float64, tf32=False)
    assert ok and error < 1e-10 and worst in reference


def test_median_and_percentiles_and_a_flush_before_every_timed_run():
    assert harness.percentiles([5.0]) == (5.0, 5.0, 5.0)
    p20, median, p80 = harness.percentiles([float(v) for v in range(1, 12)])  # 1 .. 11
    assert (p20, median, p80) == (3.0, 6.0, 9.0)
    flushes = []
    timer = harness.Timer("cpu", flush=lambda: flushes.append(1))
    results = harness.run_case("RNN", configs.parse("T3,B2,I3,H3"), torch.float32, "fwdbwd", ["torch", "rnnfused"],
                               "cpu", warmup=1, repeats=4, timer=timer)
    assert len(flushes) == 2 * 4  # the timed runs only, not the warm-up or the check
    for r in results:
        assert len(r.times_ms) == 4 and r.p20_ms <= r.ms <= r.p80_ms
    assert {r.impl: r.ratio for r in results}["torch"] == 1.0


@pytest.mark.cuda
def test_l2_flush_covers_twice_the_l2_cache():
    flush = harness.L2Flush()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    assert flush.buffer.numel() * flush.buffer.element_size() >= 2 * l2 > 0
    flush()
    assert harness.Timer("cuda").flush is not None


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
    rows[1].p20_ms, rows[1].p80_ms = 0.9, 1.2
    assert "0.900-1.200" in report.table(rows)


def test_plot_of_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [harness.Result(f"batch{b}", f"T50 B{b} I128 H128", "GRU", "float32", "fwd", "rnnfused", ms=1.0,
                           ratio=r) for b, r in ((1, 0.5), (4, 0.8), (16, 1.2))]
    path, why_not = report.plot(rows, str(tmp_path), "B", "test")
    assert path.endswith("time_ratio_vs_batch.png") and os.path.getsize(path) > 0 and why_not is None


def test_plot_of_cases(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [harness.Result("cfg", "T1 B2 I3 H4", cell, "float32", "fwd", "rnnfused", ms=1.0, ratio=r)
            for cell, r in (("LSTM", 1.3), ("GRU", 0.6))]
    path, _ = report.plot_cases(rows, str(tmp_path), "test")
    assert path.endswith("time_ratio.png") and os.path.getsize(path) > 0
    assert report.plot_cases(rows[:0], str(tmp_path), "empty") == \
        (None, "no rnnfused result with a torch.nn time to compare with")


def test_floor_times_the_products_next_to_both_layers(capsys):
    from bench import floor

    assert floor.main(["--configs", "T4,B2,I3,H5", "--rounds", "1", "--threads", str(torch.get_num_threads())]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("T4 B2 I3 H5")]
    assert [row[4] for row in rows] == ["fwd", "fwd+bwd"]
    # Columns: products, rnnfused and torch ms, then the two ratios. The two products of so small a
    # forward can take under the 0.005 ms that prints as 0.00; the layers take tenths of a millisecond.
    assert all(float(value) >= 0 for row in rows for value in row[5:])
    assert all(float(row[i]) > 0 for row in rows for i in (6, 7, 9))
    with pytest.raises(SystemExit):  # a stack's products are not one layer's
        floor.main(["--configs", "T4,B2,I3,H5,L2", "--rounds", "1"])


@pytest.mark.parametrize("suite,args", [("resets", ["--shape", "6,4,8"]), ("lengths", ["--shape", "6,4,8"]),
                                        ("regularisers", ["--shape", "5,3,8", "--layers", "2"])])
def test_the_delegated_cpu_suites_run_and_write_their_csv(suite, args, tmp_path):
    """A tiny run of each suite with a command line of its own: every implementation timed,
    and none of those checked against the reference refused."""
    import csv
    import importlib
    module = importlib.import_module(f"bench.{suite}")
    assert module.main([*args, "--device", "cpu", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    with open(tmp_path / f"{suite}.csv") as f:
        header, *rows = list(csv.reader(f))
    assert rows and all(row[header.index("ms")] not in ("", "None") for row in rows)
    if "check" in header:
        assert not any(row[header.index("check")].startswith("refused") for row in rows)


def test_the_exchange_bandwidth_is_the_extra_payload_over_the_extra_time():
    # 7 peers x (4096 - 16) bytes more in 1 us more: 28.56 bytes per ns; no extra time: unbounded.
    assert barrier.pushed_bytes_per_ns(8, 1.0, 2.0) == pytest.approx(7 * 4080 / 1000)
    assert barrier.pushed_bytes_per_ns(2, 1.0, 1.0) == float("inf")
