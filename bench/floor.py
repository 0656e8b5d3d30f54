"""python -m bench.floor: the LSTM's matrix products alone, next to rnnfused and torch.nn.

An LSTM layer's forward multiplies x by W_ihᵀ and every h_{t-1} by W_hhᵀ; its backward
multiplies the gate gradients dG by W_hh and W_ih (dh, dx) and dGᵀ by x and by h_{t-1}
(dW_ih, dW_hh). This times those six products as single ATen matrix products over all
T * B rows (the recurrent one too, which a real layer must split into T dependent steps),
so their sum is a lower bound for any implementation that runs at ATen's (MKL's) matrix
product rate: what no pointwise fusion, threading or packing can get under. Reported in the
same interleaved run as rnnfused.LSTM and torch.nn.LSTM (oneDNN's fused LSTM on the CPU),
median of the rounds, as times and as ratios to torch.nn.
"""

import argparse
import statistics
import time

import torch

import rnnfused

from . import configs


def timed(fn):
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def products(T, B, I, H, backward):
    """The layer's products as ATen calls: a function that runs them all once."""
    N, G = T * B, 4 * H
    x, h = torch.randn(N, I), torch.randn(N, H)
    w_ih, w_hh = torch.randn(G, I), torch.randn(G, H)
    dG = torch.randn(N, G)

    def run():
        torch.mm(x, w_ih.t())
        torch.mm(h, w_hh.t())
        if backward:
            torch.mm(dG, w_hh)
            torch.mm(dG, w_ih)
            torch.mm(dG.t(), x)
            torch.mm(dG.t(), h)

    return run


def layer(module, T, B, I, backward):
    x = torch.randn(T, B, I, requires_grad=backward)

    def run():
        if backward:
            module(x)[0].sum().backward()
        else:
            with torch.no_grad():
                module(x)

    return run


def measure(T, B, I, H, backward, rounds):
    torch.manual_seed(0)
    ours = rnnfused.LSTM(I, H)
    theirs = torch.nn.LSTM(I, H)
    theirs.load_state_dict(ours.state_dict())
    runs = {"products": products(T, B, I, H, backward), "rnnfused": layer(ours, T, B, I, backward),
            "torch": layer(theirs, T, B, I, backward)}
    for run in runs.values():  # warm up: caches, packed weights, thread pools
        run()
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(timed(run))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="cpu_fastrnns;cpu_latency_b1;cpu_small;T512,B1,I256,H256;"
                        "T100,B64,I512,H512",
                        help="';'-separated one-layer configs, by name or T,B,I,H (default: the one-layer "
                        "shapes of the CPU table in docs/measurements.md)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, LSTM, median of {args.rounds} rounds; "
          "'products' = the six matrix products alone (forward: two)")
    print(f"{'shape':<22}{'mode':<8}{'products ms':>12}{'rnnfused ms':>12}{'torch ms':>10}"
          f"{'products x torch':>18}{'rnnfused x torch':>18}")
    for config in args.configs.split(";"):
        c = configs.parse(config)
        if c.layers > 1 or c.bidirectional or c.packed or c.cell_loop:
            parser.error(f"{config}: one layer, one direction, padded")
        T, B, I, H = c.T, c.B, c.I, c.H
        for backward in (False, True):
            ms = measure(T, B, I, H, backward, args.rounds)
            print(f"{f'T{T} B{B} I{I} H{H}':<22}{'fwd+bwd' if backward else 'fwd':<8}{ms['products']:>12.2f}"
                  f"{ms['rnnfused']:>12.2f}{ms['torch']:>10.2f}{ms['products'] / ms['torch']:>18.2f}"
                  f"{ms['rnnfused'] / ms['torch']:>18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
