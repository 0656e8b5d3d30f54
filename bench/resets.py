"""python -m bench.resets (also ``python -m bench --suite resets``): episode resets inside the
fused kernels against what users write today.

Setup (torchrl's benchmark): B128 T128 I=H=256, float32, forward + backward, a fixed fraction
of steps resetting (3% by default, Bernoulli, fixed seed). Implementations, interleaved:

  rnnfused_resets   rnnfused.LSTM(x, resets=resets)
  rnnfused_plain    the same call without resets (the cost of the resets is the ratio)
  torch_split_pad   each row split at its resets, every segment padded into one batch, torch.nn
                    on the PackedSequence, the outputs scattered back (what cuDNN users do)
  torch_cell_loop   a Python loop of torch.nn.LSTMCell, the state zeroed at each reset

Before timing, the three that compute the layer with resets are checked against the float64
reference (rnnfused.reference.forward(..., resets=)); a wrong one is refused. Times are
medians (CUDA events on a GPU, the wall clock on a CPU); ratios are to rnnfused_resets in the
same run.
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

CLASSES = {"LSTM": (nn.LSTM, rnnfused.LSTM, nn.LSTMCell), "GRU": (nn.GRU, rnnfused.GRU, nn.GRUCell)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.resets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="LSTM,GRU", help="default: %(default)s")
    parser.add_argument("--shape", default="128,128,256", help="T,B,H (I = H; default %(default)s)")
    parser.add_argument("--reset-rate", type=float, default=0.03, help="fraction of steps resetting (default 0.03)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="results/resets", help="folder for resets.csv (default %(default)s)")
    return parser.parse_args(argv)


def segments_of(resets):
    """[(row, start, end)] of every segment of resets [T, B] (a segment starts at step 0 and at
    every reset)."""
    steps, batch = resets.shape
    starts = resets.t().tolist()
    out = []
    for b in range(batch):
        begin = [0] + [t for t in range(1, steps) if starts[b][t]]
        out += [(b, s, e) for s, e in zip(begin, begin[1:] + [steps])]
    return out


def split_pad_forward(module, x, resets):
    """torch.nn on every segment as its own sequence: one packed call, then scattered back into
    [T, B, H]. Zero initial states (no hx), forward direction only."""
    steps, batch, _ = x.shape
    segments = segments_of(resets.cpu())
    longest = max(e - s for _, s, e in segments)
    lengths = torch.tensor([e - s for _, s, e in segments])
    # Flat index of (t, b) in x for every (segment, position); padding repeats position 0.
    index = torch.tensor([[(min(s + k, e - 1)) * batch + b for (b, s, e) in segments] for k in range(longest)],
                         device=x.device)
    padded = x.reshape(steps * batch, -1)[index.reshape(-1)].reshape(longest, len(segments), -1)
    output, _ = module(pack_padded_sequence(padded, lengths, enforce_sorted=False))
    output, _ = pad_packed_sequence(output, total_length=longest)
    valid = (torch.arange(longest).unsqueeze(1) < lengths.unsqueeze(0)).to(x.device)
    flat = torch.zeros(steps * batch, output.size(-1), device=x.device, dtype=output.dtype)
    return flat.index_copy(0, index[valid], output[valid]).reshape(steps, batch, -1)


def cell_loop_forward(cell, x, resets):
    keep = (~resets).to(x.dtype).unsqueeze(-1)  # [T, B, 1]
    h = x.new_zeros(x.size(1), cell.hidden_size)
    state = (h, h) if isinstance(cell, nn.LSTMCell) else h
    outputs = []
    for t in range(x.size(0)):
        state = tuple(s * keep[t] for s in state) if isinstance(state, tuple) else state * keep[t]
        state = cell(x[t], state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs)


def _build(name, hidden, device):
    theirs_cls, ours_cls, cell_cls = CLASSES[name]
    torch.manual_seed(0)
    theirs = theirs_cls(hidden, hidden).to(device)
    ours = ours_cls(hidden, hidden).to(device)
    ours.load_state_dict(theirs.state_dict())
    cell = cell_cls(hidden, hidden).to(device)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in theirs.state_dict().items()})
    return {
        "rnnfused_resets": lambda x, r: ours(x, resets=r)[0],
        "rnnfused_plain": lambda x, r: ours(x)[0],
        "torch_split_pad": lambda x, r: split_pad_forward(theirs, x, r),
        "torch_cell_loop": lambda x, r: cell_loop_forward(cell, x, r),
    }, ours


def _run(forward, x, resets):
    leaf = x.detach().requires_grad_()
    output = forward(leaf, resets)
    output.backward(torch.ones_like(output))
    return output.detach(), leaf.grad


def main(argv=None):
    args = parse_args(argv)
    steps, batch, hidden = map(int, args.shape.split(","))
    device = args.device
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name in args.cells.split(","):
        runs, ours = _build(name, hidden, device)
        x = torch.randn(steps, batch, hidden, generator=generator).to(device)
        resets = (torch.rand(steps, batch, generator=generator) < args.reset_rate).to(device)
        # Check against the float64 reference before timing.
        reference = rnnfused.reference.forward(ours.double(), x.double().requires_grad_(), resets=resets)[0]
        ours.float()
        checked = {}
        for impl, forward in runs.items():
            if impl == "rnnfused_plain":
                checked[impl] = "not checked (no resets)"
                continue
            error = (forward(x, resets).double() - reference).abs().max().item()
            checked[impl] = "ok" if error <= 1e-3 else f"refused: error {error:.2e}"
        times = {impl: [] for impl in runs}
        for repeat in range(args.warmup + args.repeats):
            for impl, forward in runs.items():
                if checked[impl].startswith("refused"):
                    continue
                begin = synced_clock(device)
                _run(forward, x, resets)
                elapsed = (synced_clock(device) - begin) * 1000
                if repeat >= args.warmup:
                    times[impl].append(elapsed)
        base = statistics.median(times["rnnfused_resets"])
        for impl in runs:
            ms = statistics.median(times[impl]) if times[impl] else None
            rows.append([name, f"T{steps} B{batch} H{hidden}", args.reset_rate, impl, checked[impl],
                         None if ms is None else round(ms, 3), None if ms is None else round(ms / base, 3)])
    header = ["cell", "shape", "reset_rate", "impl", "check", "ms", "ratio_to_rnnfused_resets"]
    print(f"{'cell':5} {'impl':16} {'ms (fwd+bwd)':>13} {'ratio':>7}  check   ({device}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats})")
    for row in rows:
        print(f"{row[0]:5} {row[3]:16} {row[5] if row[5] is not None else '-':>13} "
              f"{row[6] if row[6] is not None else '-':>7}  {row[4]}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "resets.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
