"""One-to-many: generating a whole sequence from a single input.

Each target is a curve of 64 steps: a sine, a triangle or a rounded square wave, with a
frequency and a phase. The only input is a start vector (one-hot shape, frequency, phase
as cos/sin), given at the first step; every later input is zero, so the LSTM must write
the whole curve from what it keeps in its state. The metric is the mean squared error of
the generated curves against the truth on start vectors not seen in training (a model
that outputs zeros scores about 0.5).

    python examples/one_to_many.py                 # rnnfused layers
    python examples/one_to_many.py --impl torch    # the same with torch.nn

Writes examples/out/one_to_many.png (generated curves against the truth).
"""

import argparse
import math
import os
import time

import torch
from torch import nn

import rnnfused
from plotting import pyplot

SHAPES = ["sine", "triangle", "square"]
STEPS = 64


def curves(count, generator):
    """(start vectors [count, 6], curves [count, STEPS])."""
    shape = torch.randint(0, len(SHAPES), (count,), generator=generator)
    frequency = 1 + 2 * torch.rand(count, generator=generator)  # 1 to 3 periods
    phase = 2 * math.pi * torch.rand(count, generator=generator)
    angle = 2 * math.pi * frequency[:, None] * torch.arange(STEPS) / STEPS + phase[:, None]
    waves = torch.stack([torch.sin(angle),
                         2 / math.pi * torch.asin(torch.sin(angle)),
                         torch.tanh(3 * torch.sin(angle))], dim=1)
    target = waves[torch.arange(count), shape]
    start = torch.cat([nn.functional.one_hot(shape, len(SHAPES)).float(), (frequency[:, None] - 2),
                       torch.cos(phase)[:, None], torch.sin(phase)[:, None]], dim=1)
    return start, target


class OneToMany(nn.Module):
    def __init__(self, hidden, library):
        super().__init__()
        self.rnn = library.LSTM(6, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, start):
        """[B, 6] start vectors -> [B, STEPS] curves."""
        inputs = torch.zeros(start.shape[0], STEPS, 6)
        inputs[:, 0] = start
        output, _ = self.rnn(inputs)
        return self.readout(output).squeeze(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["rnnfused", "torch"], default="rnnfused", help="layer library")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    library = rnnfused if args.impl == "rnnfused" else nn

    torch.manual_seed(args.seed)
    model = OneToMany(args.hidden, library)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    start_time = time.perf_counter()
    for step in range(1, args.steps + 1):
        start, target = curves(args.batch, generator)
        loss = nn.functional.mse_loss(model(start), target)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0:
            print(f"step {step}: training MSE {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start_time

    test_start, test_target = curves(1000, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        generated = model(test_start)
    mse = nn.functional.mse_loss(generated, test_target).item()
    zeros = test_target.pow(2).mean().item()
    print(f"curves generated from unseen start vectors ({args.impl}, {args.steps} steps in {seconds:.0f} s): "
          f"MSE {mse:.4f} against the truth (all zeros: {zeros:.3f})")
    for i, name in enumerate(SHAPES):
        rows = test_start[:, i] == 1
        print(f"  {name:8s} MSE {nn.functional.mse_loss(generated[rows], test_target[rows]).item():.4f}")

    plt = pyplot()
    if plt is None:
        return
    os.makedirs(args.out, exist_ok=True)
    fig, axes = plt.subplots(len(SHAPES), 2, figsize=(8, 6), sharex=True, sharey=True)
    for i in range(len(SHAPES)):
        rows = torch.nonzero(test_start[:, i] == 1).flatten()[:2]
        for ax, row in zip(axes[i], rows.tolist()):
            ax.plot(test_target[row], color="gray", label="truth")
            ax.plot(generated[row], color="C1", linestyle="--", label="generated")
            ax.set_title(SHAPES[i], fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"one-to-many, generated from the start vector ({args.impl}): MSE {mse:.4f}")
    fig.tight_layout()
    path = os.path.join(args.out, "one_to_many.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
