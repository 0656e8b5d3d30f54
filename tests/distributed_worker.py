"""Training steps run by tests/test_distributed.py in each of two gloo processes (and once
alone): a small model with a recurrent layer, float64, SGD on a fixed global batch."""

import datetime
import gc

import torch
import torch.distributed as dist
from torch import nn

import rnnfused

STEPS, BATCH, LR = 3, 8, 0.1


class Model(nn.Module):
    def __init__(self, recurrent):
        super().__init__()
        self.rnn = recurrent(3, 5, num_layers=2, bidirectional=True)
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])


def make_model(impl):
    torch.manual_seed(0)
    return Model(rnnfused.LSTM if impl == "rnnfused" else nn.LSTM).double()


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(6, BATCH, 3, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=g, dtype=torch.float64))


def train(model, rank=0, world=1):
    """STEPS of SGD on this rank's share of each global batch; returns the parameters and the
    gradients of the last step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, target = global_batch(step)
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        optimizer.zero_grad()
        loss = ((model(x[:, share]) - target[share]) ** 2).mean()
        loss.backward()
        optimizer.step()
    return {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}


def _run(rank, world, impl, wrapper, out):
    model = make_model(impl)
    if wrapper in ("ddp", "ddp+compile"):
        model = nn.parallel.DistributedDataParallel(model)
        if wrapper == "ddp+compile":
            model = torch.compile(model, fullgraph=False)
        result = train(model, rank, world)
        result = {name.replace("_orig_mod.", "").replace("module.", ""): value for name, value in result.items()}
    else:  # fsdp2
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
        result = train(model, rank, world)
        result = {name: tuple(t.full_tensor() for t in value) for name, value in result.items()}
    if rank == 0:
        torch.save(result, out)


def worker(rank, world, init_file, impl, wrapper, out):
    # A file rendezvous: a free TCP port found by the parent can be taken before the workers
    # bind it. The timeout bounds a hang (a peer that died) instead of gloo's 30 minutes.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    _run(rank, world, impl, wrapper, out)
    # Teardown, in this order, so that no gloo thread outlives what it serves:
    # - what holds the process group (DDP's reducer, FSDP's hooks, and torch.compile's caches,
    #   which keep the compiled model) is released while the interpreter is fully alive: left
    #   to interpreter shutdown, a gloo worker still holding tensors aborts the process
    #   ("terminate called without an active exception");
    # - a barrier: no rank closes its connections while the other still uses them;
    # - then the process group itself.
    torch._dynamo.reset()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
