"""python -m bench.overhead: the fixed cost of one layer call, in microseconds.

A one-layer LSTM/GRU/RNN with T=1, B=1, I=H=8 (a decoder's or generate loop's call) and the
cells with B=1, I=H=8 do almost no arithmetic, so their time is what the Python wrapper, the
dispatcher, autograd and the kernel launch cost. Reported next to torch.nn's (the same layer)
as the median of many calls, forward under no_grad and forward + backward.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import rnnfused


CELLS = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")


def per_call_us(fn, calls, rounds=7):
    """Median over `rounds` of the mean time of `calls` calls of fn, in microseconds."""
    for _ in range(calls // 10 + 1):
        fn()
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - begin) / calls * 1e6)
    return statistics.median(times)


def measure(cell, impl, calls):
    torch.manual_seed(0)
    module = getattr(rnnfused if impl == "rnnfused" else nn, cell)(8, 8)
    x = torch.randn(1, 8) if cell.endswith("Cell") else torch.randn(1, 1, 8)
    x_grad = x.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        output = module(x_grad)
        (output if isinstance(output, torch.Tensor) else output[0]).sum().backward()

    return per_call_us(forward, calls), per_call_us(forward_backward, calls)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS,
                        help="what to measure (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); µs per call of a 1-layer T=1 B=1 I=H=8 layer "
          "(cells: B=1 I=H=8)")
    print(f"{'cell':<10}{'impl':<10}{'forward':>10}{'fwd+bwd':>10}")
    for cell in args.cells:
        for impl in ("rnnfused", "torch"):
            forward, forward_backward = measure(cell, impl, args.calls)
            print(f"{cell:<10}{impl:<10}{forward:>10.1f}{forward_backward:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
