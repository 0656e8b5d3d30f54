"""python -m bench.lengths (also ``python -m bench --suite lengths``): padded input with
per-sequence lengths, against what users write today.

Setup: fastrnns-like T100 B64 I=H=512 on a GPU (T100 B32 H256 on a CPU), float32, forward +
backward, lengths uniform in [T/2, T] (fixed seed; one sequence of length T). Implementations,
interleaved:

  rnnfused_lengths  layer(x, lengths=lengths): on a GPU step flags (no host sync), on a CPU
                    the packed path
  rnnfused_dense    the same layer on a dense batch with as many steps as the lengths hold
                    in all (B sequences of the mean length): the target's "dense time for the
                    same number of valid steps"
  torch_packed      pack_padded_sequence (lengths on the host), torch.nn, pad_packed_sequence

Before timing, rnnfused_lengths is checked against torch_packed. Times are medians (CUDA
events on a GPU, the wall clock on a CPU); ratios are to rnnfused_lengths in the same run.
"""

import argparse
import csv
import os
import statistics
import sys

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfused

from .harness import synced_clock

CLASSES = {"LSTM": (nn.LSTM, rnnfused.LSTM), "GRU": (nn.GRU, rnnfused.GRU)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.lengths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="LSTM,GRU", help="default: %(default)s")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", help="T,B,H (I = H; default 100,64,512 on a GPU, 100,32,256 on a CPU)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="results/lengths", help="folder for lengths.csv (default %(default)s)")
    return parser.parse_args(argv)


def _fwdbwd(forward, x):
    leaf = x.detach().requires_grad_()
    output = forward(leaf)
    output.backward(torch.ones_like(output))
    return output.detach()


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    steps, batch, hidden = map(int, (args.shape or ("100,64,512" if device == "cuda" else "100,32,256")).split(","))
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    mean_steps = round(lengths.float().mean().item())
    lengths_here = lengths.to(device)
    rows = []
    for name in args.cells.split(","):
        theirs_cls, ours_cls = CLASSES[name]
        torch.manual_seed(0)
        theirs = theirs_cls(hidden, hidden).to(device, dtype)
        ours = ours_cls(hidden, hidden).to(device, dtype)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(steps, batch, hidden, generator=generator).to(device, dtype)
        dense = torch.randn(mean_steps, batch, hidden, generator=generator).to(device, dtype)

        def torch_packed(a):
            output, _ = theirs(pack_padded_sequence(a, lengths, enforce_sorted=False))
            return pad_packed_sequence(output, total_length=steps)[0]

        runs = {
            "rnnfused_lengths": (lambda a: ours(a, lengths=lengths_here)[0], x),
            "rnnfused_dense": (lambda a: ours(a)[0], dense),
            "torch_packed": (torch_packed, x),
        }
        error = (_fwdbwd(runs["rnnfused_lengths"][0], x).float() - _fwdbwd(torch_packed, x).float()).abs().max().item()
        check = "ok" if error <= (1e-4 if dtype == torch.float32 else 5e-2) else f"refused: error {error:.2e}"
        times = {impl: [] for impl in runs}
        for repeat in range(args.warmup + args.repeats):
            for impl, (forward, data) in runs.items():
                if impl == "rnnfused_lengths" and check != "ok":
                    continue
                begin = synced_clock(device)
                _fwdbwd(forward, data)
                if repeat >= args.warmup:
                    times[impl].append((synced_clock(device) - begin) * 1000)
        base = statistics.median(times["rnnfused_lengths"]) if times["rnnfused_lengths"] else None
        for impl in runs:
            ms = statistics.median(times[impl]) if times[impl] else None
            ratio = None if ms is None or base is None else round(ms / base, 3)
            rows.append([name, f"T{steps} B{batch} H{hidden} {args.dtype}", mean_steps, impl,
                         check if impl == "rnnfused_lengths" else "", None if ms is None else round(ms, 3), ratio])
    print(f"{'cell':5} {'impl':17} {'ms (fwd+bwd)':>13} {'ratio':>7}  ({device}, lengths in [T/2, T], mean "
          f"{mean_steps}; median of {args.repeats})")
    for row in rows:
        print(f"{row[0]:5} {row[3]:17} {row[5] if row[5] is not None else '-':>13} "
              f"{row[6] if row[6] is not None else '-':>7}  {row[4]}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lengths.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["cell", "shape", "mean_steps", "impl", "check", "ms", "ratio_to_rnnfused_lengths"]]
                                + rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
