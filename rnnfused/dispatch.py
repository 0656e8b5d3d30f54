"""Which kernel runs a recurrent layer: ours (fused), cuDNN through torch's own RNN op, or the
reference equations. The choice a stack makes for one call, from the measured table and the
GPU verification record beside this file.

On the CPU our kernels always run (torch.nn's CPU kernels are slower; README). On CUDA,
``auto`` (the default) decides per call:

1. A layer cuDNN can compute exactly (no ``norm``, ``cell_clip``, ``grad_clip``,
   ``reset_after=False``, ``lengths`` or ``resets``) runs cuDNN, through the very op
   ``torch.nn`` calls, unless the measured table (``kernel_table.json``, written on a GPU by
   ``python -m bench --suite tune``) has a row for this architecture, build, cell, dtype and
   size bucket in which our kernels were faster; then ours. Nothing measured: cuDNN, so that a
   drop-in layer is never slower than what it replaces. In deterministic mode
   (``torch.use_deterministic_algorithms(True)``) training never runs cuDNN, whose RNN backward
   torch documents as possibly nondeterministic; ours is bitwise repeatable (no atomics).
2. A layer only we can compute runs our fused kernels where a GPU run has verified this
   build's device code on this architecture (``gpu_verified.json``: the record written by
   ``make gpu-check``, tied to the hash of the device sources the build compiled), else the
   reference equations (exact, slower), with a warning that says why.

``RNNFUSED_KERNEL`` overrides: ``cudnn`` (cuDNN wherever it applies, an error where it does
not), ``ours`` / ``stepwise`` / ``persistent`` (our kernels, verified or not; the last two
also pick which of ours, see csrc/kernel_choice.h). ``RNNFUSED_AUTOTUNE=1`` times ours against
cuDNN once per table key in the process (instead of reading the table) and keeps the
faster. :func:`rnnfused.explain` shows every choice and the table row or rule behind it.
"""

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from . import _C

__all__ = ["Choice", "choose", "decide", "reload", "table_key", "table_rows", "verified_architectures"]

_HERE = Path(__file__).resolve().parent
VERIFIED_FILE = _HERE / "gpu_verified.json"
TABLE_FILE = _HERE / "kernel_table.json"
# Ours is chosen over cuDNN only when the table measured it at least this much faster: a
# margin against timing noise, so that "never slower than torch.nn" holds.
MARGIN = 0.95


@dataclasses.dataclass(frozen=True)
class Choice:
    """kernel: ``"ours"``, ``"cudnn"`` or ``"reference"``; reason: why, in words; row: the
    table row behind it (a dict) or None."""

    kernel: str
    reason: str
    row: dict = None


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


# Read once, at import (and by reload()): the dispatch then runs on plain dictionaries, which
# torch.compile traces without a break.
_VERIFIED = {}
_ROWS = {}


def reload():
    """(Re)reads the verification record and the table for this build's hash
    (``_C.device_source_hash``) and tells the operators the verified architectures."""
    built = _C.device_source_hash
    _VERIFIED.clear()
    _VERIFIED.update({int(record["compute_capability"]): record
                      for record in _load(VERIFIED_FILE).get("records", [])
                      if built and record.get("device_source_hash") == built and record.get("result") == "passed"})
    _ROWS.clear()
    _ROWS.update({tuple(row["key"]): row for row in _load(TABLE_FILE).get("rows", [])
                  if built and row.get("device_source_hash") == built})
    _C.set_verified_architectures(sorted(_VERIFIED))


def verified_architectures():
    """{compute capability (e.g. 90): its record} of the GPU runs that verified this build's
    device code (the hash the build compiled, ``_C.device_source_hash``)."""
    return _VERIFIED


def table_rows():
    """{key: row} of the measured table's rows for this build."""
    return _ROWS


def _bucket(value, edges):
    """The smallest edge >= value (the last edge for larger values)."""
    for edge in edges:
        if value <= edge:
            return edge
    return edges[-1]


HIDDEN_BUCKETS = (64, 128, 256, 512, 1024, 2048)
BATCH_BUCKETS = (1, 8, 32, 128, 512)


def table_key(compute_capability, mode, dtype, hidden_size, batch, num_layers, bidirectional, training, tf32):
    """The table's key of a layer stack: rows are measured per architecture, cell, dtype, size
    bucket (hidden size and batch rounded up to HIDDEN_BUCKETS and BATCH_BUCKETS), one or more
    layers, directions, training (forward + backward) or inference, and for float32 whether
    TF32 was allowed."""
    return (int(compute_capability), mode, str(dtype).replace("torch.", ""), _bucket(hidden_size, HIDDEN_BUCKETS),
            _bucket(batch, BATCH_BUCKETS), min(num_layers, 2), bool(bidirectional), bool(training),
            bool(tf32) if dtype == torch.float32 else False)


def _setting():
    return os.environ.get("RNNFUSED_KERNEL") or "auto"


def what_cudnn_lacks(module, flags):
    """The extras of ``module`` (and of this call) that torch's own RNN op cannot compute, in
    words; empty when it can compute the layer exactly."""
    lacks = []
    if getattr(module, "norm", None) is not None:
        lacks.append(f"norm={module.norm!r}")
    for name in ("cell_clip", "grad_clip"):
        if getattr(module, name, None) is not None:
            lacks.append(f"{name}={getattr(module, name)}")
    if getattr(module, "reset_after", True) is not True:
        lacks.append("reset_after=False")
    if flags is not None:
        lacks.append("lengths or resets")
    regularisers = getattr(module, "regularisers", None)
    if regularisers is not None:
        lacks.extend(regularisers.active(module.training, getattr(module, "dropout", 0)))
    return lacks


def effective_dtype(weight):
    """The dtype a layer with this weight computes in: autocast's where it is on (float64 aside)."""
    device_type = weight.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _compute_capability(device):
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _tf32_allowed():
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the choice of one call depends on: the device type, its compute capability (e.g. 90;
    0 off CUDA), what cuDNN cannot compute in this layer, whether the call is being traced
    (torch.compile / export), whether it trains in deterministic mode, and its table key."""

    device_type: str
    compute_capability: int = 0
    lacks: tuple = ()
    compiling: bool = False
    deterministic_training: bool = False
    key: tuple = None


def _architecture(compute_capability):
    return f"compute capability {compute_capability // 10}.{compute_capability % 10}"


def decide(facts, setting, verified, rows, autotune=None):
    """The choice for ``facts`` under the RNNFUSED_KERNEL ``setting``, given the verification
    records ({compute capability: record}) and table rows ({key: row}) of this build; a pure
    function (rnnfused.dispatch's rules, tested with made-up records and rows)."""
    if facts.device_type != "cuda":
        if setting == "cudnn":
            raise RuntimeError(f"rnnfused: RNNFUSED_KERNEL=cudnn but the layer is on {facts.device_type}; cuDNN runs "
                               "on CUDA")
        return Choice("ours", f"our kernels run on {facts.device_type}")
    if setting in ("ours", "stepwise", "persistent"):
        return Choice("ours", f"RNNFUSED_KERNEL={setting}")
    if setting == "cudnn":
        if facts.lacks:
            raise RuntimeError(f"rnnfused: RNNFUSED_KERNEL=cudnn but cuDNN cannot compute this layer: "
                               f"{', '.join(facts.lacks)}")
        return Choice("cudnn", "RNNFUSED_KERNEL=cudnn")
    record = verified.get(facts.compute_capability)

    def ours_or_reference(why):
        if record is not None:
            return Choice("ours", f"{why}; this build passed its GPU tests on {record['card']} ({record['date']})")
        return Choice("reference", f"{why}, and this build's fused kernels have not passed their GPU tests on "
                                   f"{_architecture(facts.compute_capability)} (rnnfused/gpu_verified.json): the "
                                   "reference equations run (exact, slower); RNNFUSED_KERNEL=ours runs the fused "
                                   "kernels")

    if facts.lacks:
        return ours_or_reference(f"cuDNN cannot compute {', '.join(facts.lacks)}")
    if facts.compiling:
        # Traced, torch's RNN op decomposes into a loop of small ops; our operator stays one op.
        return ours_or_reference("under torch.compile / torch.export our operator stays one op")
    if facts.deterministic_training:
        return ours_or_reference("deterministic mode: cuDNN's RNN backward may not be deterministic, ours is "
                                 "bitwise repeatable")
    if record is None:
        return Choice("cudnn", "cuDNN (torch's own RNN op): this build's fused kernels have not passed their GPU "
                               f"tests on {_architecture(facts.compute_capability)}")
    if autotune is not None:
        winner = autotune(facts.key)
        return Choice(winner, f"RNNFUSED_AUTOTUNE=1: {winner} was the faster for {facts.key} in this process")
    row = rows.get(facts.key)
    if row is None:
        return Choice("cudnn", f"cuDNN (torch's own RNN op): nothing measured for {facts.key} in "
                               "rnnfused/kernel_table.json")
    if row["ours_ms"] <= MARGIN * row["cudnn_ms"]:
        return Choice("ours", f"measured faster than cuDNN ({row['ours_ms']:.3f} vs {row['cudnn_ms']:.3f} ms, "
                              f"{row['card']}, {row['date']})", row)
    return Choice("cudnn", f"cuDNN measured faster, or ours less than {1 - MARGIN:.0%} faster ({row['cudnn_ms']:.3f} "
                           f"vs {row['ours_ms']:.3f} ms ours, {row['card']}, {row['date']})", row)


# Off CUDA the choice is always ours: one Choice per device type (a decoder's call with one step
# is short enough for building it every time to show).
_OFF_CUDA = {}


def choose(module, weight, batch, training, flags=None, autotune=None):
    """The kernel of one call of ``module`` (an rnnfused RNN / GRU / LSTM stack or cell; a cell
    is a one-layer stack of one step in the table's keys): ``weight`` is
    one of its weights (device and dtype), ``batch`` the batch size, ``training`` whether the
    call records for backward, ``flags`` its step flags (lengths / resets) or None.
    ``autotune(key)``, if given, times ours against cuDNN for the call's key (see
    RNNFUSED_AUTOTUNE) and returns "ours" or "cudnn"."""
    if not weight.is_cuda:
        device_type = "cpu" if weight.is_cpu else weight.device.type
        setting = _setting()
        if setting == "cudnn":
            return decide(Facts(device_type), setting, _VERIFIED, _ROWS)  # the error it raises
        choice = _OFF_CUDA.get(device_type)
        if choice is None:
            choice = _OFF_CUDA[device_type] = decide(Facts(device_type), setting, _VERIFIED, _ROWS)
        return choice
    else:
        device = weight.device
        compute_capability = _compute_capability(device)
        key = table_key(compute_capability, module.mode, effective_dtype(weight), module.hidden_size, batch,
                        getattr(module, "num_layers", 1), getattr(module, "bidirectional", False), training,
                        _tf32_allowed())
        facts = Facts("cuda", compute_capability, tuple(what_cudnn_lacks(module, flags)),
                      torch.compiler.is_compiling(), training and torch.are_deterministic_algorithms_enabled(), key)
    return decide(facts, _setting(), _VERIFIED, _ROWS, autotune)


# --- both directions at once ----------------------------------------------------------------

_SIDE_STREAMS = {}


def directions_side_by_side(device, reference):
    """Whether a bidirectional layer on ``device`` runs its reverse direction on a second CUDA
    stream beside the forward one, each launch as it would be alone (so the results are the
    sequential order's, bit for bit): on CUDA with our fused kernels, not under torch.compile,
    torch.export or torch.jit.trace (their graphs order the ops), not with
    RNNFUSED_CONCURRENT_DIRECTIONS=0. ``reference``: the layers run the reference equations
    (many small ops) or are normalized; they keep one stream."""
    return (torch.device(device).type == "cuda" and not reference and not _graph_orders_the_ops()
            and os.environ.get("RNNFUSED_CONCURRENT_DIRECTIONS", "1") != "0")


def _graph_orders_the_ops():
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def side_streams(device, count, main):
    """``count`` CUDA streams of ``device`` besides ``main`` (the caller's stream), for
    :func:`directions_side_by_side` and :func:`wavefront`: made once per device and
    kept; one that is ``main`` (torch hands out its streams from a pool of 32 in turn) is
    replaced by the pool's next."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    made = _SIDE_STREAMS.setdefault(index, [])
    while len(made) < count:
        made.append(torch.cuda.Stream(device=index))
    return [stream if stream != main else torch.cuda.Stream(device=index) for stream in made[:count]]


def pipeline_streams(device, count):
    """The caller's stream and ``count - 1`` others (:func:`side_streams`) on a CUDA ``device``
    for a layer pipeline; None elsewhere (the slices run one after another)."""
    if torch.device(device).type != "cuda":
        return None
    main = torch.cuda.current_stream(device)
    return [main] + side_streams(device, count - 1, main)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How a stack runs its layers (:func:`wavefront`): pipelined over ``chunks`` slices of the
    steps, or layer after layer (0); ``reason``: what explain says ('' where nothing asked)."""
    chunks: int = 0
    reason: str = ""


def wavefront(device, steps, num_layers, bidirectional, packed, unchunkable, layer):
    """How a stack runs its layers: as a layer pipeline over slices of the steps
    (modules.RNNBase._run_wavefront) or layer after layer. RNNFUSED_WAVEFRONT=n asks for n
    slices; =auto lets the planner choose, by its cost model, where the layers run the
    persistent kernel on a GPU (_C.pipeline_choice); unset or 0: layer after layer (the
    pipeline stays opt-in until a GPU run measures where it pays). Only a unidirectional padded
    stack of several layers, at least one step per slice; ``unchunkable``: the call runs the
    reference equations, draws regularisers' masks or between-layer dropout (whose random
    streams are per layer call). Off under torch.compile, torch.export and torch.jit.trace, as
    for the directions. ``layer``: a callable giving (cell, hidden size, output width, batch,
    dtype, step flags, inference) of the stack's layers, which auto plans for."""
    setting = wavefront_setting()
    if not setting or steps < 2 or num_layers < 2 or bidirectional or packed or unchunkable \
            or _graph_orders_the_ops():
        return Pipeline()
    if setting == "auto":
        cell, hidden, width, batch, dtype, step_flags, inference = layer()
        choice = _pipeline_choice(int(cell), steps, num_layers, hidden, width, batch, dtype, str(device), step_flags,
                                  inference)
        return Pipeline(choice["chunks"], "RNNFUSED_WAVEFRONT=auto: " + choice["reason"])
    chunks = min(setting, steps)
    if chunks < 2:
        return Pipeline()
    return Pipeline(chunks, f"the layers pipelined over {chunks} slices of the steps (RNNFUSED_WAVEFRONT)")


_PIPELINES = {}
_PLAN_SETTINGS = ["RNNFUSED_KERNEL"] + [f"RNNFUSED_PERSISTENT_{name}" for name in
                                        ("SMS", "SMEM_KB", "SPREAD", "TILING", "CLUSTERS", "HELD_W")]


def _pipeline_choice(*args):
    """_C.pipeline_choice(*args), made once per call shape and settings: it plans the layers
    several times over (about 0.3 ms on a CPU core), and auto asks on every call. The settings
    the plans read (kernel_choice.cpp) and TF32 are in the key; the cache is emptied where
    sequence lengths vary enough to fill it."""
    key = (args, _tf32_allowed(), tuple(os.environ.get(name) for name in _PLAN_SETTINGS))
    if key not in _PIPELINES:
        if len(_PIPELINES) >= 1024:
            _PIPELINES.clear()
        _PIPELINES[key] = _C.pipeline_choice(*args)
    return _PIPELINES[key]


def wavefront_setting():
    """What RNNFUSED_WAVEFRONT asks for: a number of slices (0 when unset) or "auto"."""
    setting = os.environ.get("RNNFUSED_WAVEFRONT", "0")
    if setting == "auto":
        return setting
    if not setting.isdigit():
        raise ValueError(f"rnnfused: RNNFUSED_WAVEFRONT must be a number of slices or auto, got {setting!r}")
    return int(setting)


# --- autotuning ------------------------------------------------------------------------------

_AUTOTUNED = {}


def autotune_enabled():
    return os.environ.get("RNNFUSED_AUTOTUNE") == "1"


def autotuned(key, candidates, repeats=5):
    """"ours" or "cudnn", whichever of ``candidates`` ({name: callable running the call once,
    backward included in training}) takes less time on the GPU, timed once per ``key`` in
    this process (the random number generators are restored afterwards)."""
    if key not in _AUTOTUNED:
        times = {}
        with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            for name, run in candidates.items():
                run()  # warm-up: plans, workspaces, caches
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    run()
                end.record()
                end.synchronize()
                times[name] = start.elapsed_time(end) / repeats
        _AUTOTUNED[key] = "ours" if times["ours"] <= MARGIN * times["cudnn"] else "cudnn"
    return _AUTOTUNED[key]


# --- the reference fallback's warning ------------------------------------------------------

_WARNED = set()


def warn_reference(choice):
    """Warns once per reason that a layer runs the reference equations."""
    if choice.reason not in _WARNED:
        _WARNED.add(choice.reason)
        warnings.warn(f"rnnfused: {choice.reason}", stacklevel=4)


reload()
