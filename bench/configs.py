"""Benchmark configurations: the cuDNN baselines' six, CPU-sized defaults, and sweeps."""

import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Config:
    name: str
    T: int  # steps
    B: int  # batch
    I: int  # input features
    H: int  # hidden units
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False  # variable lengths in [T/3, T], run as a PackedSequence
    cell_loop: bool = False  # a Python loop of T steps of the cell classes (LSTMCell, ...)

    def describe(self):
        extra = (f" L{self.layers}" if self.layers > 1 else "") + (" bi" if self.bidirectional else "") + \
            (" packed" if self.packed else "") + (" cells" if self.cell_loop else "")
        return f"T{self.T} B{self.B} I{self.I} H{self.H}{extra}"


# The six configurations of the cuDNN baselines this project started from (measured on an H200).
BASELINES = [
    Config("fastrnns", 100, 64, 512, 512),
    Config("deep4", 100, 64, 512, 512, layers=4),
    Config("bidir2", 100, 64, 512, 512, layers=2, bidirectional=True),
    Config("latency_b1", 512, 1, 256, 256),
    Config("small_b16_h128", 256, 16, 128, 128),
    Config("big", 256, 256, 1024, 1024),
]

# What a 2-core CPU finishes in a few minutes.
CPU_DEFAULTS = [
    Config("cpu_fastrnns", 100, 16, 256, 256),
    Config("cpu_bidir2", 50, 16, 128, 128, layers=2, bidirectional=True),
    Config("cpu_latency_b1", 128, 1, 128, 128),
    Config("cpu_small", 64, 8, 64, 64),
]

# T steps of LSTMCell / GRUCell / RNNCell in a Python loop, as attention decoders run them.
CELL_LOOPS = [Config("cells_fastrnns", 100, 64, 512, 512, cell_loop=True)]
CPU_CELL_LOOPS = [Config("cpu_cells", 100, 16, 256, 256, cell_loop=True)]

NAMED = {c.name: c for c in BASELINES + CPU_DEFAULTS + CELL_LOOPS + CPU_CELL_LOOPS}


def sweep(kind, device):
    """Configs that vary one of batch, hidden, seq around a base shape (smaller on CPU)."""
    gpu = device == "cuda"
    base = Config("base", 100, 64, 512, 512) if gpu else Config("base", 50, 16, 128, 128)
    values = {
        "batch": [1, 4, 16, 64, 256] if gpu else [1, 4, 16, 64],
        "hidden": [128, 256, 512, 1024] if gpu else [32, 64, 128, 256],
        "seq": [16, 64, 256, 1024] if gpu else [16, 32, 64, 128],
    }[kind]
    out = []
    for v in values:
        if kind == "batch":
            out.append(replace(base, name=f"batch{v}", B=v))
        elif kind == "hidden":
            out.append(replace(base, name=f"hidden{v}", I=v, H=v))
        else:
            out.append(replace(base, name=f"seq{v}", T=v))
    return out


_SPEC = re.compile(r"^(T|B|I|H|L)(\d+)$")


def parse(text):
    """A config by name, or a custom one: 'T100,B64,I512,H512' with optional L2, bi, packed."""
    if text in NAMED:
        return NAMED[text]
    fields = {"layers": 1, "bidirectional": False, "packed": False, "cell_loop": False}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _SPEC.match(part)
        if match:
            key, value = match.group(1), int(match.group(2))
            fields["layers" if key == "L" else key] = value
        elif part in ("bi", "bidirectional"):
            fields["bidirectional"] = True
        elif part == "packed":
            fields["packed"] = True
        elif part == "cells":
            fields["cell_loop"] = True
        else:
            raise ValueError(f"unknown config field {part!r} in {text!r} "
                             f"(names: {', '.join(NAMED)}; or e.g. T100,B64,I512,H512,L2,bi,packed or "
                             "T100,B64,I512,H512,cells)")
    missing = [k for k in "TBIH" if k not in fields]
    if missing:
        raise ValueError(f"config {text!r} lacks {', '.join(missing)}")
    if min(fields[k] for k in "TBIH") < 1 or fields["layers"] < 1:
        raise ValueError(f"config {text!r}: sizes must be positive")
    if fields["cell_loop"] and (fields["layers"] > 1 or fields["bidirectional"] or fields["packed"]):
        raise ValueError(f"config {text!r}: a cell loop is one layer, one direction, padded")
    return Config(name="custom", **fields)
