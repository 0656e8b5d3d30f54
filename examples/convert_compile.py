"""An existing torch.nn model on rnnfused: convert, packed variable-length input, torch.compile.

The model is written with plain torch.nn, as in an existing code base: characters ->
nn.Embedding -> a 2-layer bidirectional nn.LSTM -> nn.Linear on the final states. The
task: tell a line of Python code (from the standard library's own source) from a line of
English prose (Python's help text, pydoc_data.topics), reading it character by
character. Lines have 20 to 79 characters; a batch is a PackedSequence, so no step of any
line runs on padding.

The script shows the three steps of moving such a model onto rnnfused:
  1. rnnfused.convert(model) swaps the nn.LSTM for rnnfused.LSTM with the very same
     parameters (an optimizer made before keeps working) and reports what it replaced;
  2. the packed batch goes in as it did before (pack outside the compiled function);
  3. torch.compile(model, dynamic=True) compiles the whole forward in one graph, and new
     batch shapes and lengths do not recompile.
At the end it converts the trained model back to torch.nn and checks that both give the
same predictions.

    python examples/convert_compile.py                 # rnnfused, compiled
    python examples/convert_compile.py --impl torch    # the same model left on torch.nn
    python examples/convert_compile.py --no-compile    # eager

Writes examples/out/convert_compile.png (the training loss).
"""

import argparse
import glob
import os
import random
import sysconfig
import time
import tokenize

import torch
from pydoc_data.topics import topics
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import rnnfused
from plotting import pyplot

SHORTEST, LONGEST = 20, 79


def code_lines(limit=40):
    """Lines of the standard library's source that hold code only (no string, no comment)."""
    lines = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:limit]:
        with open(path, "rb") as f:
            try:
                tokens = list(tokenize.tokenize(f.readline))
            except (tokenize.TokenError, SyntaxError):
                continue
        text_rows = {row for tok in tokens if tok.type in (tokenize.STRING, tokenize.COMMENT)
                     for row in range(tok.start[0], tok.end[0] + 1)}
        rows = {}
        for tok in tokens:
            if tok.start[0] not in text_rows and tok.line.strip():
                rows[tok.start[0]] = tok.line.strip()
        lines += list(rows.values())
    return lines


def prose_lines():
    """Lines of Python's help text that start at the left margin (its prose paragraphs)."""
    return [line.strip() for text in topics.values() for line in text.splitlines()
            if line[:1].isalpha() and "::=" not in line]


def dataset(seed):
    """(train, test) lists of (text, label), label 1 for code; as many of each kind."""
    pick = random.Random(seed)
    kinds = [[line for line in lines if SHORTEST <= len(line) <= LONGEST] for lines in (prose_lines(), code_lines())]
    count = min(len(lines) for lines in kinds)
    examples = [(line, label) for label, lines in enumerate(kinds) for line in pick.sample(lines, count)]
    pick.shuffle(examples)
    split = len(examples) * 9 // 10
    return examples[:split], examples[split:]


class LineClassifier(nn.Module):
    """Plain torch.nn: [characters] -> logit that the line is code."""

    def __init__(self, vocab=128, embed=32, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, chars):
        """chars: PackedSequence of character codes (data [N]) -> logits [B]."""
        embedded = PackedSequence(self.embed(chars.data), chars.batch_sizes, chars.sorted_indices,
                                  chars.unsorted_indices)
        _, (h_n, _) = self.lstm(embedded)  # h_n [layers * 2, B, hidden], in the batch's order
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1)).squeeze(1)


def batch(examples):
    """(PackedSequence of character codes, labels [B]) for a list of (text, label)."""
    codes = [torch.tensor([min(ord(c), 127) for c in text]) for text, _ in examples]
    labels = torch.tensor([float(label) for _, label in examples])
    return pack_sequence(codes, enforce_sorted=False), labels


@torch.no_grad()
def predict(model, examples, size=500):
    return torch.cat([model(batch(examples[i:i + size])[0]) > 0 for i in range(0, len(examples), size)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["rnnfused", "torch"], default="rnnfused",
                        help="convert the model to rnnfused (default) or leave it on torch.nn")
    parser.add_argument("--no-compile", action="store_true", help="run eagerly")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default %(default)s)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train, test = dataset(args.seed)
    print(f"{len(train)} training and {len(test)} test lines, half code, half prose, {SHORTEST}-{LONGEST} characters")
    model = LineClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    if args.impl == "rnnfused":
        # 1. Swap the recurrent layers; the optimizer keeps the same Parameter objects.
        model, replaced = rnnfused.convert(model, return_replaced=True)
        print("rnnfused.convert replaced:", *replaced, sep="\n  ")
        print("rnnfused.explain for a training batch:", *rnnfused.explain(model, batch(train[:args.batch])[0]),
              sep="\n")
    # 3. Compile the whole forward; dynamic=True: new batch sizes and lengths reuse the graph.
    run = model if args.no_compile else torch.compile(model, dynamic=True, backend=args.backend)

    losses, start = [], time.perf_counter()
    pick = random.Random(args.seed)
    for step in range(1, args.steps + 1):
        chars, labels = batch(pick.sample(train, args.batch))  # 2. packed outside the compiled function
        loss = nn.functional.binary_cross_entropy_with_logits(run(chars), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == 1:
            print(f"step {step}: training loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start

    model.eval()
    labels = torch.tensor([label for _, label in test], dtype=torch.bool)
    predictions = predict(model, test)
    accuracy = (predictions == labels).float().mean().item()
    print(f"test accuracy ({args.impl}{'' if args.no_compile else ', compiled'}, {args.steps} steps in "
          f"{seconds:.0f} s): {accuracy:.3f} (guessing: 0.5)")
    if args.impl == "rnnfused":
        back = rnnfused.convert(model, to="torch")  # and back: torch.nn layers with the trained weights
        agree = (predict(back, test) == predictions).float().mean().item()
        print(f"converted back to torch.nn: {type(back.lstm).__module__}.{type(back.lstm).__name__}, "
              f"same prediction on {agree:.1%} of the test lines")
    for text, label in test[:3]:
        guess = predict(model, [(text, label)])[0].item()
        print(f"  {'code ' if guess else 'prose'} <- {text!r}")

    plt = pyplot()
    if plt is None:
        return
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (binary cross-entropy)")
    ax.set_title(f"code or prose ({args.impl}): test accuracy {accuracy:.3f}")
    fig.tight_layout()
    path = os.path.join(args.out, "convert_compile.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
