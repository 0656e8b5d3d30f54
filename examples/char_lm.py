"""Many-to-many: a character-level language model on English text that ships with Python.

The text is Python's own help topics (pydoc_data.topics, about 0.47 M characters of prose and
code examples). The last 10% is held out. A one-layer LSTM reads windows of characters and
predicts the next character at every position; the metric is bits per character (bpc)
on the held-out text (a uniform guess over the alphabet costs log2(alphabet) ≈ 6.6 bpc).
After training it prints a sample.

    python examples/char_lm.py                 # rnnfused layers
    python examples/char_lm.py --impl torch    # the same with torch.nn
    python examples/char_lm.py --regularise    # weight drop, recurrent dropout, zoneout (rnnfused.regularisers)
    python examples/char_lm.py --steps 1500    # a fixed number of steps instead of the time budget

Writes examples/out/char_lm.png (training and held-out bpc).
"""

import argparse
import math
import os
import time

import torch
from pydoc_data.topics import topics
from torch import nn

import rnnfused
from plotting import pyplot


def load_text():
    text = "\n\n".join(topics[key] for key in sorted(topics))
    alphabet = sorted(set(text))
    index = {ch: i for i, ch in enumerate(alphabet)}
    codes = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    split = int(len(codes) * 0.9)
    return codes[:split], codes[split:], alphabet


class CharModel(nn.Module):
    def __init__(self, vocab, embed, hidden, library, regularisers=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = library.LSTM(embed, hidden, batch_first=True, **(regularisers or {}))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, codes, state=None):
        output, state = self.rnn(self.embed(codes), state)
        return self.head(output), state


def windows(codes, batch, length, generator):
    starts = torch.randint(0, len(codes) - length - 1, (batch,), generator=generator)
    chunk = torch.stack([codes[s:s + length + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def held_out_bpc(model, codes, streams=16, length=256):
    """Bits per character over the held-out text, read as `streams` contiguous streams
    with the state carried from window to window, in eval mode (no weight drop; zoneout's
    expectation)."""
    training = model.training
    model.eval()
    usable = (len(codes) - 1) // streams * streams
    inputs = codes[:usable].view(streams, -1)
    targets = codes[1:usable + 1].view(streams, -1)
    state, total, count = None, 0.0, 0
    for start in range(0, inputs.shape[1], length):
        logits, state = model(inputs[:, start:start + length], state)
        target = targets[:, start:start + length]
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             reduction="sum").item()
        count += target.numel()
    model.train(training)
    return total / count / math.log(2)


@torch.no_grad()
def sample(model, alphabet, prompt, length, temperature, generator):
    model.eval()
    index = {ch: i for i, ch in enumerate(alphabet)}
    codes = torch.tensor([[index[ch] for ch in prompt]])
    logits, state = model(codes)
    out = list(prompt)
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, dim=0)
        code = torch.multinomial(probs, 1, generator=generator)
        out.append(alphabet[code.item()])
        logits, state = model(code.view(1, 1), state)
    return "".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["rnnfused", "torch"], default="rnnfused", help="layer library")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="characters per training window")
    parser.add_argument("--seconds", type=float, default=100, help="training time budget")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the time budget only)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regularise", action="store_true",
                        help="weight_drop=0.3, recurrent_dropout=0.1 and zoneout=0.05 on the LSTM (rnnfused only)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    library = rnnfused if args.impl == "rnnfused" else nn
    if args.regularise and args.impl != "rnnfused":
        parser.error("--regularise needs --impl rnnfused (torch.nn has no weight drop or zoneout)")
    regularisers = {"weight_drop": 0.3, "recurrent_dropout": 0.1, "zoneout": 0.05} if args.regularise else None

    train_codes, test_codes, alphabet = load_text()
    print(f"text: {len(train_codes)} training and {len(test_codes)} held-out characters, "
          f"alphabet of {len(alphabet)} (uniform: {math.log2(len(alphabet)):.2f} bpc)")
    torch.manual_seed(args.seed)
    model = CharModel(len(alphabet), args.embed, args.hidden, library, regularisers)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    train_curve, test_curve = [], []
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds and (args.steps == 0 or step < args.steps):
        x, y = windows(train_codes, args.batch, args.length, generator)
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(alphabet)), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        train_curve.append((step, loss.item() / math.log(2)))
        if step % 200 == 0:
            test_curve.append((step, held_out_bpc(model, test_codes[:20000])))
            print(f"step {step}: training {train_curve[-1][1]:.2f} bpc, held-out (first 20k chars) "
                  f"{test_curve[-1][1]:.2f} bpc", flush=True)
    seconds = time.perf_counter() - start
    bpc = held_out_bpc(model, test_codes)
    label = args.impl + (", regularised" if args.regularise else "")
    print(f"held-out bits per character ({label}, {step} steps in {seconds:.0f} s): {bpc:.3f}")
    print("sample:\n" + sample(model, alphabet, "The ", 300, 0.7, torch.Generator().manual_seed(1)))

    plt = pyplot()
    if plt is None:
        return
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train_curve), alpha=0.5, label="training (per batch)")
    if test_curve:
        ax.plot(*zip(*test_curve), marker="o", label="held-out")
    ax.set_xlabel("training step")
    ax.set_ylabel("bits per character")
    ax.set_title(f"char LSTM on pydoc topics ({label}): held-out {bpc:.2f} bpc")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "char_lm.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
