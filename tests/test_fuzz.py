"""A seeded fuzzer (the cuDNN frontend's way): random configurations of every module and cell,
each against torch.nn, or against rnnfused.reference where torch.nn lacks a feature (grad_clip,
cell_clip, reset_after=False, norm, resets), outputs and every gradient (input, states,
parameters).

Case i runs seed S + i (S from --fuzz-seed or RNNFUSED_FUZZ_SEED, default 0; ``random`` draws
one and the header prints it); --fuzz-count (RNNFUSED_FUZZ_COUNT) sets how many, 500 by
default. A failure prints its configuration and the command that replays it alone.
Shapes stay tiny: the point is the combinations, and the whole run takes seconds."""

import random

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnfused
from conftest import fuzz_settings, max_error
from rnnfused import reference

# Largest error allowed against the oracle, relative to max(1, max |value|) (conftest.max_error).
FUZZ_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}

CELLS = ["LSTM", "GRU", "GRU_CHO", "RNN_TANH", "RNN_RELU"]


def pytest_generate_tests(metafunc):
    if "fuzz_seed" in metafunc.fixturenames:
        first, count = fuzz_settings(metafunc.config)
        metafunc.parametrize("fuzz_seed", range(first, first + count), ids=lambda seed: f"seed{seed}")


def draw(seed):
    """The configuration of seed ``seed``: a dict of plain values (printed on failure)."""
    rng = random.Random(seed)
    cell = rng.choice(CELLS)
    c = {"seed": seed, "cell": cell, "dtype": rng.choices(["float64", "float32"], [3, 1])[0],
         "bias": rng.random() < 0.8, "input_size": rng.randint(1, 5), "hidden": rng.randint(1, 6),
         "grad_clip": round(rng.uniform(0.05, 2.0), 3) if rng.random() < 0.25 else None,
         "cell_clip": round(rng.uniform(0.2, 3.0), 3) if cell == "LSTM" and rng.random() < 0.25 else None,
         "with_hx": rng.random() < 0.6, "training": rng.random() < 0.8}
    if rng.random() < 0.12:  # a cell module: one step
        c.update(kind="cell", batch=rng.choice([0, 1, 2, 3, 4]), unbatched=rng.random() < 0.2,
                 reset=rng.random() < 0.3)
        return c
    c.update(kind="stack", layers=rng.randint(1, 3), bidirectional=rng.random() < 0.5,
             batch_first=rng.random() < 0.3,
             # 8 steps or more run the persistent CPU kernels, fewer the stepwise ones.
             steps=rng.randint(8, 11) if rng.random() < 0.25 else rng.randint(1, 6), batch=rng.randint(1, 4),
             proj=rng.randint(1, c["hidden"] - 1) if cell == "LSTM" and c["hidden"] > 1 and rng.random() < 0.3 else 0,
             input=rng.choice(["padded", "padded", "packed", "packed_sorted", "lengths", "unbatched"]),
             norm=rng.choice([None, None, None, None, "layer", "batch"]))
    if c["norm"] is not None:
        c["dtype"] = "float64"  # a batch of 2 can have a tiny variance: float32 amplifies its rounding
        if c["input"] == "lengths":
            c["input"] = "padded"  # normalized layers take no lengths (nor resets)
        if c["norm"] == "batch" and c["training"]:  # a single row in training is an error, as nn.BatchNorm1d's
            c["batch"] = max(c["batch"], 2)
            c["training"] = c["input"] != "unbatched"
    c["resets"] = c["norm"] is None and c["input"] in ("padded", "unbatched") and rng.random() < 0.25
    return c


def _randn(generator, *shape, dtype):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _replay(seed):
    return f"replay: pytest tests/test_fuzz.py --fuzz-seed={seed} --fuzz-count=1"


def _gradients(values, leaves, generator):
    """Gradients w.r.t. ``leaves`` of a fixed random weighting of ``values`` (None for a leaf
    that does not reach them). The graph is kept: both runs may share the packing of x."""
    loss = sum((v * _randn(generator, *v.shape, dtype=v.dtype)).sum() for v in values)
    return list(torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True))


def _flat(result):
    output, hidden = result
    if isinstance(output, PackedSequence):
        output = output.data
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def _stack_case(c):
    dtype = getattr(torch, c["dtype"])
    kwargs = dict(num_layers=c["layers"], bidirectional=c["bidirectional"], bias=c["bias"],
                  batch_first=c["batch_first"] and c["input"] not in ("packed", "packed_sorted", "unbatched"))
    extra = {}
    if c["proj"]:
        kwargs["proj_size"] = c["proj"]
    for name in ("grad_clip", "cell_clip", "norm"):
        if c[name] is not None:
            extra[name] = c[name]
    if c["cell"] == "GRU_CHO":
        extra["reset_after"] = False
    torch_name, ours_name = {"LSTM": ("LSTM", "LSTM"), "GRU": ("GRU", "GRU"), "GRU_CHO": (None, "GRU"),
                             "RNN_TANH": ("RNN", "RNN"), "RNN_RELU": ("RNN", "RNN")}[c["cell"]]
    if c["cell"].startswith("RNN"):
        kwargs["nonlinearity"] = c["cell"][4:].lower()
    torch.manual_seed(c["seed"])
    ours = getattr(rnnfused, ours_name)(c["input_size"], c["hidden"], **kwargs, **extra).to(dtype)
    ours.train(c["training"])
    if c["norm"] == "batch":  # running statistics as after some training, not the identity
        with torch.no_grad():
            for name, buffer in ours.named_buffers():
                buffer.copy_(torch.rand_like(buffer) + 0.5 if "var" in name else torch.randn_like(buffer))
    needs_reference = bool(extra) or c["resets"]
    theirs = None
    if not needs_reference:
        theirs = getattr(nn, torch_name)(c["input_size"], c["hidden"], **kwargs).to(dtype)
        theirs.load_state_dict(ours.state_dict())

    g = torch.Generator().manual_seed(c["seed"])
    steps, batch = c["steps"], c["batch"]
    x = _randn(g, steps, batch, c["input_size"], dtype=dtype)
    states = c["layers"] * (2 if c["bidirectional"] else 1)
    width = c["proj"] or c["hidden"]
    unbatched = c["input"] == "unbatched"
    hx = None
    if c["with_hx"]:
        shape = (states, width) if unbatched else (states, batch, width)
        hx = _randn(g, *shape, dtype=dtype)
        if c["cell"] == "LSTM":
            hx = (hx, _randn(g, *shape[:-1], c["hidden"], dtype=dtype))
    lengths = torch.tensor(random.Random(c["seed"] + 1).choices(range(1, steps + 1), k=batch))
    resets = None
    if c["resets"]:
        resets = torch.rand(steps, batch, generator=g) < 0.3
        if unbatched:
            resets = resets[:, 0]
        elif kwargs["batch_first"]:
            resets = resets.t()
    return ours, theirs, x, hx, lengths, resets, kwargs["batch_first"]


def _run_stack(c):
    ours, theirs, x, hx, lengths, resets, batch_first = _stack_case(c)
    kind = c["input"]
    leaves_x = x.clone().requires_grad_()
    hx_leaves = [] if hx is None else [t.clone().requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,))]
    hx_arg = None if hx is None else (tuple(hx_leaves) if isinstance(hx, tuple) else hx_leaves[0])

    def arrange(x):
        """The module input (and its keywords) built from the time-major x [T, B, I]."""
        if kind in ("packed", "packed_sorted"):
            sorted_lengths = lengths.sort(descending=True).values if kind == "packed_sorted" else lengths
            return pack_padded_sequence(x, sorted_lengths, enforce_sorted=kind == "packed_sorted"), {}
        if kind == "unbatched":
            return x[:, 0], ({"resets": resets} if resets is not None else {})
        inp = x.transpose(0, 1) if batch_first else x
        keywords = {"lengths": lengths} if kind == "lengths" else {}
        if resets is not None:
            keywords["resets"] = resets
        return inp, keywords

    inp, keywords = arrange(leaves_x)
    generator_seed = c["seed"] + 2
    if theirs is None:  # the reference equations on the same module (before batch norm updates its statistics)
        expected = _flat(reference.forward(ours, inp, hx_arg, **keywords))
        expected_grads = _gradients(expected, [leaves_x, *hx_leaves, *ours.parameters()],
                                    torch.Generator().manual_seed(generator_seed))
        actual = _flat(ours(inp, hx_arg, **keywords))
        actual_grads = _gradients(actual, [leaves_x, *hx_leaves, *ours.parameters()],
                                  torch.Generator().manual_seed(generator_seed))
        return actual, actual_grads, expected, expected_grads
    actual = _flat(ours(inp, hx_arg, **keywords))
    actual_grads = _gradients(actual, [leaves_x, *hx_leaves, *ours.parameters()],
                              torch.Generator().manual_seed(generator_seed))
    # torch.nn: the same leaves (fresh copies), lengths through a packed sequence padded back.
    their_x = x.clone().requires_grad_()
    their_hx = [t.clone().requires_grad_() for t in hx_leaves]
    their_hx_arg = None if hx is None else (tuple(their_hx) if isinstance(hx, tuple) else their_hx[0])
    if kind == "lengths":
        packed = pack_padded_sequence(their_x, lengths, enforce_sorted=False)
        output, hidden = theirs(packed, their_hx_arg)
        output = pad_packed_sequence(output, total_length=c["steps"])[0]
        expected = _flat((output.transpose(0, 1) if batch_first else output, hidden))
    else:
        expected = _flat(theirs(arrange(their_x)[0], their_hx_arg))
    expected_grads = _gradients(expected, [their_x, *their_hx, *theirs.parameters()],
                                torch.Generator().manual_seed(generator_seed))
    return actual, actual_grads, expected, expected_grads


def _run_cell(c):
    dtype = getattr(torch, c["dtype"])
    name = {"LSTM": "LSTMCell", "GRU": "GRUCell", "GRU_CHO": "GRUCell", "RNN_TANH": "RNNCell",
            "RNN_RELU": "RNNCell"}[c["cell"]]
    kwargs = {"bias": c["bias"]}
    if c["cell"].startswith("RNN"):
        kwargs["nonlinearity"] = c["cell"][4:].lower()
    extra = {k: c[k] for k in ("grad_clip", "cell_clip") if c[k] is not None}
    if c["cell"] == "GRU_CHO":
        extra["reset_after"] = False
    torch.manual_seed(c["seed"])
    ours = getattr(rnnfused, name)(c["input_size"], c["hidden"], **kwargs, **extra).to(dtype)
    g = torch.Generator().manual_seed(c["seed"])
    batch_shape = () if c["unbatched"] else (c["batch"],)
    x = _randn(g, *batch_shape, c["input_size"], dtype=dtype).requires_grad_()
    states = []
    if c["with_hx"]:
        states = [_randn(g, *batch_shape, c["hidden"], dtype=dtype).requires_grad_()
                  for _ in range(2 if c["cell"] == "LSTM" else 1)]
    reset = (torch.rand(batch_shape, generator=g) < 0.5) if c["reset"] else None
    hx = (tuple(states) if c["cell"] == "LSTM" else states[0]) if states else None
    result = ours(x, hx, reset=reset)
    actual = list(result) if isinstance(result, tuple) else [result]
    leaves = [x, *states, *ours.parameters()]
    actual_grads = _gradients(actual, leaves, torch.Generator().manual_seed(c["seed"] + 2))

    # The oracle: a reset row starts from zero states, which is torch.nn's step on zeroed states.
    full = [s if s is not None else torch.zeros(*batch_shape, c["hidden"], dtype=dtype)
            for s in (states or [None] * (2 if c["cell"] == "LSTM" else 1))]
    if reset is not None:
        full = [torch.where(reset.unsqueeze(-1), torch.zeros_like(s), s) for s in full]
    if extra:
        weights = {"w_ih": ours.weight_ih, "w_hh": ours.weight_hh, "b_ih": ours.bias_ih, "b_hh": ours.bias_hh,
                   "w_hr": None}
        unsqueeze = (lambda t: t.unsqueeze(0)) if c["unbatched"] else (lambda t: t)
        h, cell_state = reference.cell_step(
            c["cell"] if c["cell"] != "GRU_CHO" else "GRU", unsqueeze(x), unsqueeze(full[0]),
            unsqueeze(full[1]) if c["cell"] == "LSTM" else None, weights, reset_after=c["cell"] != "GRU_CHO",
            cell_clip=c["cell_clip"], grad_clip=c["grad_clip"])
        squeeze = (lambda t: t.squeeze(0)) if c["unbatched"] else (lambda t: t)
        expected = [squeeze(h)] + ([squeeze(cell_state)] if c["cell"] == "LSTM" else [])
    else:
        theirs = getattr(nn, name)(c["input_size"], c["hidden"], **kwargs).to(dtype)
        theirs.load_state_dict(ours.state_dict())
        result = theirs(x, tuple(full) if c["cell"] == "LSTM" else full[0])
        expected = list(result) if isinstance(result, tuple) else [result]
        leaves = [x, *states, *theirs.parameters()]
    expected_grads = _gradients(expected, leaves, torch.Generator().manual_seed(c["seed"] + 2))
    return actual, actual_grads, expected, expected_grads


def _paired(actual, expected):
    """The gradient pairs to compare: a leaf that reaches no result on one side (None, e.g. the
    hx of a cell whose rows all reset) must have a zero gradient on the other."""
    pairs = [(torch.zeros_like(e) if a is None else a, torch.zeros_like(a) if e is None else e)
             for a, e in zip(actual, expected) if a is not None or e is not None]
    return [a for a, _ in pairs], [e for _, e in pairs]


def test_fuzz(fuzz_seed):
    c = draw(fuzz_seed)
    run = _run_cell if c["kind"] == "cell" else _run_stack
    actual, actual_grads, expected, expected_grads = run(c)
    tolerance = FUZZ_TOLERANCE[getattr(torch, c["dtype"])]
    values_error = max_error([a.detach() for a in actual], [e.detach() for e in expected])
    grads_error = max_error(*_paired(actual_grads, expected_grads))
    assert values_error <= tolerance and grads_error <= tolerance, (
        f"values error {values_error:.3g}, gradients error {grads_error:.3g} (tolerance {tolerance:g}) for {c}; "
        f"{_replay(fuzz_seed)}")
