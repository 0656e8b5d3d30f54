"""rnnfused under DistributedDataParallel (and FSDP2) with the gloo backend: two processes on
the CPU train the same model as one process on the whole batch, and as torch.nn does."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_worker as worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _distributed(impl, wrapper, tmp_path):
    out = tmp_path / f"{impl}-{wrapper}.pt"
    init_file = tmp_path / f"{impl}-{wrapper}.rendezvous"
    mp.spawn(worker.worker, args=(2, str(init_file), impl, wrapper, str(out)), nprocs=2, join=True)
    return torch.load(out)


def _assert_close(actual, expected, tolerance=1e-12):
    assert actual.keys() == expected.keys()
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert (a - e).abs().max() <= tolerance, name


@pytest.mark.parametrize("wrapper", ["ddp", "ddp+compile"])
def test_ddp_matches_one_process_and_torch_nn(wrapper, tmp_path):
    alone = worker.train(worker.make_model("rnnfused"))
    ours = _distributed("rnnfused", wrapper, tmp_path)
    _assert_close(ours, alone)
    if wrapper == "ddp":
        _assert_close(ours, _distributed("torch", "ddp", tmp_path))


def test_fsdp2_matches_one_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    _assert_close(_distributed("rnnfused", "fsdp2", tmp_path), worker.train(worker.make_model("rnnfused")))
