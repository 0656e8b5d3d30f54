"""Many-to-one: the adding problem of the LSTM paper (Hochreiter & Schmidhuber 1997).

Each input is a sequence of (value, marker) pairs: values uniform in [0, 1], exactly two
markers set, one in each half of the sequence. The target is the sum of the two marked
values, read from the last hidden state. Predicting the mean (1.0) gives a mean squared
error of 1/6 ≈ 0.167; a model has solved the task when its error is far below that. With
the markers a long way from the end, the plain tanh RNN cannot carry the values across
the lag; LSTM and GRU can.

    python examples/adding_problem.py                 # rnnfused layers
    python examples/adding_problem.py --impl torch    # the same with torch.nn
    python examples/adding_problem.py --cells LSTM,RNN --norm none,batch,layer
                                                      # normalized layers against plain ones

Prints each run's test MSE and writes examples/out/adding_problem.png (with --norm other
than none: adding_problem_norm.png).
"""

import argparse
import os
import time

import torch
from torch import nn

import rnnfused
from plotting import pyplot

BASELINE_MSE = 1.0 / 6.0  # always predicting 1.0
SOLVED_MSE = 0.01


def batch(size, length, generator):
    values = torch.rand(size, length, generator=generator)
    first = torch.randint(0, length // 2, (size,), generator=generator)
    second = torch.randint(length // 2, length, (size,), generator=generator)
    markers = torch.zeros(size, length)
    markers[torch.arange(size), first] = 1.0
    markers[torch.arange(size), second] = 1.0
    target = (values * markers).sum(dim=1, keepdim=True)
    return torch.stack([values, markers], dim=2), target  # [B, T, 2], [B, 1]


class ManyToOne(nn.Module):
    def __init__(self, cell, hidden, library, norm=None):
        super().__init__()
        layer = getattr(library, cell)
        self.rnn = layer(2, hidden, batch_first=True, **({"norm": norm} if norm else {}))
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.readout(output[:, -1])


def train(cell, norm, args, library):
    torch.manual_seed(args.seed)
    model = ManyToOne(cell, args.hidden, library, norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, target = batch(args.batch, args.length, generator)
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
    seconds = time.perf_counter() - start
    test_x, test_target = batch(2000, args.length, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        model.eval()
        test_mse = nn.functional.mse_loss(model(test_x), test_target).item()
        # Batch norm: also with the test batch's own statistics (training mode, after the
        # evaluation above: it updates the running statistics), to tell the model from the
        # running statistics that eval uses.
        model.train()
        own_statistics_mse = nn.functional.mse_loss(model(test_x), test_target).item()
    return history, test_mse, own_statistics_mse, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["rnnfused", "torch"], default="rnnfused", help="layer library")
    parser.add_argument("--cells", default="LSTM,GRU,RNN", help="comma-separated cells to train")
    parser.add_argument("--norm", default="none",
                        help="comma-separated normalizations to train each cell with: none, batch, layer (rnnfused)")
    parser.add_argument("--length", type=int, default=100, help="sequence length (the lag)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    library = rnnfused if args.impl == "rnnfused" else nn
    norms = args.norm.split(",")
    if args.impl == "torch" and norms != ["none"]:
        parser.error("--norm needs --impl rnnfused (torch.nn has no normalized recurrent layers)")

    results = {}
    for cell in args.cells.split(","):
        for norm in norms:
            name = cell if norm == "none" else f"{cell} norm={norm}"
            history, test_mse, own_statistics_mse, seconds = train(cell, None if norm == "none" else norm, args,
                                                                    library)
            results[name] = history
            verdict = "solved" if test_mse < SOLVED_MSE else "not solved"
            batch_stats = f" (with the test batch's statistics: {own_statistics_mse:.4f})" if norm == "batch" else ""
            print(f"{name:16s} ({args.impl}): test MSE {test_mse:.4f}{batch_stats} (predicting the mean: "
                  f"{BASELINE_MSE:.3f}) -> {verdict}; {args.steps} steps in {seconds:.0f} s", flush=True)

    plt = pyplot()
    if plt is None:
        return
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell, history in results.items():
        window = min(50, len(history))  # moving average over `window` steps
        smooth = torch.tensor(history).unfold(0, window, 1).mean(dim=1)
        ax.plot(torch.arange(len(smooth)) + window, smooth, label=cell)
    ax.axhline(BASELINE_MSE, color="gray", linestyle="--", label="predict the mean")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training MSE")
    ax.set_title(f"adding problem, T = {args.length} ({args.impl})")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "adding_problem.png" if norms == ["none"] else "adding_problem_norm.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
