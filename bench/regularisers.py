"""python -m bench.regularisers (also ``python -m bench --suite regularisers``): the cost of each
recurrent regulariser (rnnfused.regularisers) over the same call without it, and what users
write today for the same regularisation.

Setup: a 2-layer LSTM (or GRU), T64 B32 I=H=256 by default, float32, training mode, forward
+ backward of the output. Implementations, interleaved:

  plain               rnnfused, no regulariser (the ratios' base)
  weight_drop         rnnfused, weight_drop=0.3
  variational         rnnfused, dropout=0.3, dropout_mode="variational"
  recurrent_dropout   rnnfused, recurrent_dropout=0.3
  zoneout             rnnfused, zoneout=0.1
  zoneout_drawn       the same with the masks in the form the device does not use by default
  (zoneout_stored)    (rnnfused.regularisers.kernels_draw): drawn in the kernels on the CPU,
                      stored on a GPU, to keep that choice measured
  torch_weight_drop   torch.nn with W_hh masked for each call through torch.func.functional_call
                      (AWD-LSTM's WeightDrop without replacing the parameters)
  cell_loop_zoneout   a Python loop of nn.LSTMCell / nn.GRUCell with recurrent dropout and
                      zoneout, layer by layer (what a Keras-style implementation does)

Not checked against the reference here (the masks differ from call to call; the tests replay
them: tests/test_regularisers.py). Times are medians (CUDA events on a GPU, the wall clock on a
CPU); ratios are to ``plain`` in the same run.
"""

import argparse
import csv
import os
import statistics
import sys
from unittest import mock

import torch
from torch import nn

import rnnfused
from rnnfused import regularisers

from .harness import synced_clock

P = 0.3
RNNFUSED_OPTIONS = {"plain": {}, "weight_drop": {"weight_drop": P},
                    "variational": {"dropout": P, "dropout_mode": "variational"},
                    "recurrent_dropout": {"recurrent_dropout": P}, "zoneout": {"zoneout": 0.1}}
CELLS = {"LSTM": (nn.LSTM, nn.LSTMCell), "GRU": (nn.GRU, nn.GRUCell)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.regularisers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="LSTM,GRU", help="default: %(default)s")
    parser.add_argument("--shape", default="64,32,256", help="T,B,H (I = H; default %(default)s)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="results/regularisers", help="folder for regularisers.csv (default %(default)s)")
    return parser.parse_args(argv)


def torch_weight_drop(module):
    """torch.nn with every W_hh masked for the call: the parameters stay, the masked copies
    are passed in their place."""
    names = [n for n, _ in module.named_parameters()]

    def forward(x):
        params = {n: p for n, p in module.named_parameters()}
        for name in names:
            if name.startswith("weight_hh"):
                params[name] = params[name] * torch.empty_like(params[name]).bernoulli_(1 - P).div_(1 - P)
        return torch.func.functional_call(module, params, (x,))[0]
    return forward


def cell_loop_zoneout(cells, hidden, zoneout=0.1):
    """Layer by layer, a loop over steps: h_{t-1} masked where it enters the cell (recurrent
    dropout), then zoneout of h (and c)."""
    def forward(x):
        layer_input = x
        for cell in cells:
            batch = x.size(1)
            h = x.new_zeros(batch, hidden)
            state = (h, h) if isinstance(cell, nn.LSTMCell) else h
            mask = torch.empty_like(h).bernoulli_(1 - P).div_(1 - P)
            outputs = []
            for t in range(layer_input.size(0)):
                if isinstance(cell, nn.LSTMCell):
                    h_new, c_new = cell(layer_input[t], (state[0] * mask, state[1]))
                    keep_h, keep_c = (torch.rand_like(h_new) < zoneout).to(x.dtype), \
                        (torch.rand_like(c_new) < zoneout).to(x.dtype)
                    state = (keep_h * state[0] + (1 - keep_h) * h_new, keep_c * state[1] + (1 - keep_c) * c_new)
                    outputs.append(state[0])
                else:
                    h_new = cell(layer_input[t], state * mask)
                    keep = (torch.rand_like(h_new) < zoneout).to(x.dtype)
                    state = keep * state + (1 - keep) * h_new
                    outputs.append(state)
            layer_input = torch.stack(outputs)
        return layer_input
    return forward


def other_zoneout_form(module, device):
    """(name, forward): ``module`` with zoneout masks drawn in the kernels where the device
    stores them by default, stored where it draws them."""
    drawn = not regularisers.kernels_draw(torch.device(device))

    def forward(x):
        with mock.patch.object(regularisers, "kernels_draw", lambda _: drawn):
            return module(x)[0]
    return ("zoneout_drawn" if drawn else "zoneout_stored"), forward


def _build(name, hidden, layers, device):
    layer_cls, cell_cls = CELLS[name]
    runs = {}
    for impl, options in RNNFUSED_OPTIONS.items():
        torch.manual_seed(0)
        module = getattr(rnnfused, name)(hidden, hidden, num_layers=layers, **options).to(device)
        runs[impl] = (lambda m: lambda x: m(x)[0])(module)
        if impl == "zoneout":
            other, forward = other_zoneout_form(module, device)
            runs[other] = forward
    torch.manual_seed(0)
    runs["torch_weight_drop"] = torch_weight_drop(layer_cls(hidden, hidden, num_layers=layers).to(device))
    cells = [cell_cls(hidden, hidden).to(device) for _ in range(layers)]
    runs["cell_loop_zoneout"] = cell_loop_zoneout(cells, hidden)
    return runs


def main(argv=None):
    args = parse_args(argv)
    steps, batch, hidden = map(int, args.shape.split(","))
    device = args.device
    x = torch.randn(steps, batch, hidden, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    names = args.cells.split(",")
    if not set(names) <= set(CELLS):
        raise SystemExit(f"bench.regularisers: --cells takes LSTM and GRU, got {args.cells!r}")
    for name in names:
        runs = _build(name, hidden, args.layers, device)
        times = {impl: [] for impl in runs}
        for repeat in range(args.warmup + args.repeats):
            for impl, forward in runs.items():
                leaf = x.detach().requires_grad_()
                begin = synced_clock(device)
                forward(leaf).sum().backward()
                elapsed = (synced_clock(device) - begin) * 1000
                if repeat >= args.warmup:
                    times[impl].append(elapsed)
        base = statistics.median(times["plain"])
        for impl in runs:
            ms = statistics.median(times[impl])
            rows.append([name, f"T{steps} B{batch} H{hidden} L{args.layers}", device, impl, round(ms, 3),
                         round(ms / base, 3)])
    header = ["cell", "shape", "device", "impl", "ms", "ratio_to_plain"]
    print(f"{'cell':5} {'impl':18} {'ms (fwd+bwd)':>13} {'ratio':>7}   ({device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats})")
    for row in rows:
        print(f"{row[0]:5} {row[3]:18} {row[4]:>13} {row[5]:>7}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "regularisers.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
