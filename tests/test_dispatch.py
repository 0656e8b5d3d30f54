"""rnnfused.dispatch: the choice between our kernels, cuDNN (torch's own RNN op) and the
reference equations; its rules with made-up verification records and table rows (CPU), the
cuDNN route's plumbing (torch's op runs on the CPU too), and on a GPU that every choice gives
the same results."""

import json

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused import dispatch
from rnnfused.dispatch import Choice, Facts, decide, table_key
from conftest import MODES, TOLERANCE, flatten, make_twins, max_error, tf32_switch

RECORD = {"card": "Test GPU", "date": "2026-12-04", "compute_capability": 90}
KEY = table_key(90, "LSTM", torch.float16, 512, 64, 1, False, True, False)


def _row(ours_ms, cudnn_ms):
    return {"key": list(KEY), "ours_ms": ours_ms, "cudnn_ms": cudnn_ms, "card": "Test GPU", "date": "2026-12-04"}


def _cuda(**kwargs):
    return Facts("cuda", 90, key=KEY, **kwargs)


def test_the_cpu_runs_ours_and_refuses_cudnn():
    assert decide(Facts("cpu"), "auto", {}, {}).kernel == "ours"
    with pytest.raises(RuntimeError, match="cuDNN runs on CUDA"):
        decide(Facts("cpu"), "cudnn", {}, {})


def test_an_unverified_build_never_runs_our_kernels_by_default():
    assert decide(_cuda(), "auto", {}, {KEY: _row(0.1, 1.0)}).kernel == "cudnn"
    extras = decide(_cuda(lacks=("grad_clip=1.0",)), "auto", {}, {})
    assert extras.kernel == "reference" and "have not passed their GPU tests" in extras.reason
    assert decide(_cuda(compiling=True), "auto", {}, {}).kernel == "reference"
    assert decide(_cuda(deterministic_training=True), "auto", {}, {}).kernel == "reference"
    # A record of another architecture does not count.
    assert decide(_cuda(lacks=("norm='layer'",)), "auto", {80: RECORD}, {}).kernel == "reference"


def test_a_verified_build_runs_ours_where_measured_faster_else_cudnn():
    verified = {90: RECORD}
    assert decide(_cuda(), "auto", verified, {}).kernel == "cudnn"  # nothing measured
    faster = decide(_cuda(), "auto", verified, {KEY: _row(0.5, 1.0)})
    assert faster.kernel == "ours" and faster.row["ours_ms"] == 0.5
    assert decide(_cuda(), "auto", verified, {KEY: _row(1.2, 1.0)}).kernel == "cudnn"
    assert decide(_cuda(), "auto", verified, {KEY: _row(0.97, 1.0)}).kernel == "cudnn"  # within the margin
    other_key = table_key(90, "GRU", torch.float16, 512, 64, 1, False, True, False)
    assert decide(Facts("cuda", 90, key=other_key), "auto", verified, {KEY: _row(0.5, 1.0)}).kernel == "cudnn"


def test_extras_are_never_routed_to_cudnn():
    for lacks in (("norm='batch'",), ("cell_clip=1.0",), ("reset_after=False",), ("lengths or resets",)):
        assert decide(_cuda(lacks=lacks), "auto", {90: RECORD}, {KEY: _row(5.0, 1.0)}).kernel == "ours"
        with pytest.raises(RuntimeError, match="cuDNN cannot compute this layer"):
            decide(_cuda(lacks=lacks), "cudnn", {90: RECORD}, {})


def test_deterministic_training_excludes_cudnn():
    choice = decide(_cuda(deterministic_training=True), "auto", {90: RECORD}, {KEY: _row(5.0, 1.0)})
    assert choice.kernel == "ours" and "bitwise repeatable" in choice.reason


def test_settings_force_a_kernel():
    for setting in ("ours", "stepwise", "persistent"):
        assert decide(_cuda(), setting, {}, {}).kernel == "ours"
    assert decide(_cuda(), "cudnn", {90: RECORD}, {KEY: _row(0.1, 1.0)}).kernel == "cudnn"


def test_autotune_decides_where_verified():
    asked = []

    def autotune(key):
        asked.append(key)
        return "ours"
    assert decide(_cuda(), "auto", {90: RECORD}, {}, autotune).kernel == "ours"
    assert asked == [KEY]
    assert decide(_cuda(), "auto", {}, {}, autotune).kernel == "cudnn"  # unverified: not even timed
    assert asked == [KEY]


def test_table_key_buckets():
    assert table_key(90, "GRU", torch.float32, 300, 20, 4, True, False, True) == \
        (90, "GRU", "float32", 512, 32, 2, True, False, True)
    assert table_key(80, "LSTM", torch.bfloat16, 5000, 1, 1, False, True, True)[3:5] == (2048, 1)
    assert table_key(80, "LSTM", torch.bfloat16, 64, 1, 1, False, True, True)[-1] is False  # tf32: fp32 only


def test_what_cudnn_lacks():
    assert dispatch.what_cudnn_lacks(rnnfused.LSTM(2, 3, num_layers=2, bidirectional=True), None) == []
    assert dispatch.what_cudnn_lacks(rnnfused.LSTM(2, 3, cell_clip=1.0, grad_clip=2.0), None) == \
        ["cell_clip=1.0", "grad_clip=2.0"]
    assert dispatch.what_cudnn_lacks(rnnfused.GRU(2, 3, reset_after=False, norm="layer"), None) == \
        ["norm='layer'", "reset_after=False"]
    assert dispatch.what_cudnn_lacks(rnnfused.RNN(2, 3), torch.zeros(1)) == ["lengths or resets"]


def test_records_and_rows_count_only_for_the_hash_the_build_compiled(tmp_path, monkeypatch):
    built = rnnfused._C.device_source_hash
    records = {"records": [dict(RECORD, device_source_hash=built, result="passed"),
                           dict(RECORD, compute_capability=80, device_source_hash="0" * 64, result="passed"),
                           dict(RECORD, compute_capability=89, device_source_hash=built, result="failed")]}
    rows = {"rows": [dict(_row(0.5, 1.0), device_source_hash=built),
                     dict(_row(0.5, 1.0), key=[80] + list(KEY[1:]), device_source_hash="0" * 64)]}
    (tmp_path / "verified.json").write_text(json.dumps(records))
    (tmp_path / "table.json").write_text(json.dumps(rows))
    monkeypatch.setattr(dispatch, "VERIFIED_FILE", tmp_path / "verified.json")
    monkeypatch.setattr(dispatch, "TABLE_FILE", tmp_path / "table.json")
    dispatch.reload()
    try:
        assert list(dispatch.verified_architectures()) == [90]
        assert list(dispatch.table_rows()) == [KEY]
    finally:
        monkeypatch.undo()
        dispatch.reload()


def test_the_committed_files_parse():
    assert isinstance(dispatch._load(dispatch.VERIFIED_FILE)["records"], list)
    assert isinstance(dispatch._load(dispatch.TABLE_FILE)["rows"], list)


@pytest.mark.parametrize("mode", list(MODES) + ["LSTM_PROJ"])
@pytest.mark.parametrize("packed", [False, True])
def test_the_cudnn_route_is_torch_nn(mode, packed, monkeypatch):
    """The route to torch's own RNN op (cuDNN on a GPU) runs here on torch's CPU kernel: the
    same op torch.nn calls, so the results are identical to torch.nn's, for padded and packed
    input, h0 given, bidirectional stacks and projections."""
    monkeypatch.setattr(dispatch, "choose", lambda *args, **kwargs: Choice("cudnn", "test"))
    extra = {"proj_size": 2} if mode == "LSTM_PROJ" else {}
    theirs, ours = make_twins("LSTM" if mode == "LSTM_PROJ" else mode, 3, 5, num_layers=2, bidirectional=True,
                              batch_first=True, **extra)
    generator = torch.Generator().manual_seed(0)
    if packed:
        x = pack_sequence([torch.randn(n, 3, generator=generator, dtype=torch.float64) for n in (4, 6, 2)],
                          enforce_sorted=False)
    else:
        x = torch.randn(3, 6, 3, generator=generator, dtype=torch.float64)
    width = 2 if extra else 5
    h0 = torch.randn(4, 3, width, generator=generator, dtype=torch.float64)
    hx = (h0, torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)) if "LSTM" in mode else h0
    assert max_error(flatten(ours(x, hx)), flatten(theirs(x, hx))) == 0


def test_flatten_parameters_leaves_cpu_weights_alone():
    module = rnnfused.LSTM(3, 4, num_layers=2)
    pointers = [p.data_ptr() for p in module.parameters()]
    module.flatten_parameters()
    assert [p.data_ptr() for p in module.parameters()] == pointers


@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_choice_gives_the_same_results_on_a_gpu(mode, dtype, monkeypatch):
    """cuDNN, our stepwise kernels and ours with the persistent kernel where it plans, against
    each other, forward and backward, within the dtype's tolerance (TF32 off)."""
    _, ours = make_twins(mode, 16, 32, num_layers=2, bidirectional=True, dtype=dtype, device="cuda")
    x = torch.randn(20, 8, 16, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    with tf32_switch("allow_tf32", False), tf32_switch("allow_tf32", False, torch.backends.cudnn):
        for setting in ("cudnn", "stepwise", "ours"):
            monkeypatch.setenv("RNNFUSED_KERNEL", setting)
            leaf = x.clone().requires_grad_()
            outputs = flatten(ours(leaf))
            grads = torch.autograd.grad(sum(o.sum() for o in outputs), [leaf] + list(ours.parameters()))
            results[setting] = list(outputs) + list(grads)
    assert max_error(results["stepwise"], results["cudnn"]) <= TOLERANCE[dtype]
    assert max_error(results["ours"], results["cudnn"]) <= TOLERANCE[dtype]


def test_tune_measures_nothing_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here: make gpu-check runs the tune suite")
    from bench import tune
    table = tmp_path / "table.json"
    table.write_text('{"rows": []}')
    assert tune.main(["--table", str(table), "--out", str(tmp_path)]) == 1
    assert json.loads(table.read_text()) == {"rows": []}


def test_tune_replaces_the_rows_it_measured_and_keeps_the_others(tmp_path):
    from bench import tune
    table = tmp_path / "table.json"
    old = [dict(_row(1.0, 2.0), device_source_hash="a"), dict(_row(1.0, 2.0), device_source_hash="b")]
    table.write_text(json.dumps({"rows": old, "runs": [{"date": "before"}]}))
    new = [dict(_row(3.0, 2.0), device_source_hash="a")]
    tune._write_table(str(table), new, {"date": "now"})
    written = json.loads(table.read_text())
    assert written["rows"] == [old[1], new[0]]
    assert [run["date"] for run in written["runs"]] == ["before", "now"]


def test_the_bench_cli_hands_delegated_suites_their_arguments():
    from bench import cli
    assert cli._delegated(["--suite", "tune", "--budget", "3"]) == ("tune", ["--budget", "3"])
    assert cli._delegated(["--repeats", "2", "--suite=resets"]) == ("resets", ["--repeats", "2"])
    assert cli._delegated(["--suite", "gpu-check"]) is None


def test_directions_side_by_side_only_on_cuda_with_our_kernels(monkeypatch):
    monkeypatch.delenv("RNNFUSED_CONCURRENT_DIRECTIONS", raising=False)
    assert not dispatch.directions_side_by_side("cpu", reference=False)
    assert dispatch.directions_side_by_side("cuda:0", reference=False)
    assert not dispatch.directions_side_by_side("cuda", reference=True)
    monkeypatch.setenv("RNNFUSED_CONCURRENT_DIRECTIONS", "0")
    assert not dispatch.directions_side_by_side("cuda", reference=False)

