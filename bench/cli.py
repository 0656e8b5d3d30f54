"""python -m bench: compare rnnfused with torch.nn and the other implementations."""

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import rnnfused

from . import configs, harness, impls, report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
CELLS = ["LSTM", "GRU", "RNN", "RNN_RELU"]

MODES = ["fwd", "fwdbwd"]


@dataclass(frozen=True)
class Suite:
    """A named set of cases: `configs(device)` lists the configurations; cells and dtypes
    per device. The command line's --configs/--cells/--dtypes override them. A new suite is
    one more entry in SUITES."""

    description: str
    configs: Callable[[str], list]
    gpu_cells: tuple = ("LSTM", "GRU")
    cpu_cells: tuple = ("LSTM", "GRU", "RNN")
    gpu_dtypes: tuple = ("float16", "bfloat16", "float32")
    cpu_dtypes: tuple = ("float32",)


def _named(*names):
    return lambda device: [configs.NAMED[name] for name in names]


def _packed(device):
    base = configs.NAMED["fastrnns" if device == "cuda" else "cpu_fastrnns"]
    return [base, configs.Config(base.name + "_packed", base.T, base.B, base.I, base.H, packed=True)]


def _sweep(kind):
    return lambda device: configs.sweep(kind, device)


SUITES = {
    "default": Suite("the six configs of the cuDNN baselines (H200, 2026-11-26) on a GPU for LSTM/GRU in "
                     "fp16/bf16/fp32; CPU-sized configs on a CPU",
                     lambda device: configs.BASELINES if device == "cuda" else configs.CPU_DEFAULTS),
    "baselines": Suite("the six configs of the cuDNN baselines with every cell (LSTM, GRU, RNN)",
                       lambda device: configs.BASELINES if device == "cuda" else configs.CPU_DEFAULTS,
                       gpu_cells=("LSTM", "GRU", "RNN")),
    "gpu-check": Suite("fastrnns, latency_b1 and small_b16_h128 for LSTM and GRU in fp16, bf16, fp32 (make gpu-check)",
                       _named("fastrnns", "latency_b1", "small_b16_h128")),
    "sweep-batch": Suite("batch sizes around a base shape, with a plot", _sweep("batch")),
    "sweep-hidden": Suite("hidden sizes around a base shape, with a plot", _sweep("hidden")),
    "sweep-seq": Suite("sequence lengths around a base shape", _sweep("seq")),
    "packed": Suite("variable lengths in [T/3, T] as PackedSequence, next to the padded run", _packed),
    "cells": Suite("a Python loop of T steps of LSTMCell / GRUCell / RNNCell against torch.nn's cells",
                   lambda device: configs.CELL_LOOPS if device == "cuda" else configs.CPU_CELL_LOOPS,
                   gpu_cells=("LSTM", "GRU", "RNN")),
}


# Suites with a command line of their own (each module's --help): `python -m bench --suite NAME
# ARGS` runs `python -m bench.NAME ARGS`.
DELEGATED = {
    "tune": "ours against cuDNN on this GPU for every key of the dispatch's table; writes "
            "rnnfused/kernel_table.json (bench/tune.py)",
    "resets": "episode resets in the fused layer against split-and-pad torch.nn and an LSTMCell loop "
              "(bench/resets.py)",
    "lengths": "padded input with lengths= against the dense run of as many steps and torch.nn's packed path "
               "(bench/lengths.py)",
    "regularisers": "the cost of weight drop, variational and recurrent dropout and zoneout over the plain "
                    "call, and the loops users write for them (bench/regularisers.py)",
}


def _delegated(argv):
    """(module name, its arguments) when argv asks for a delegated suite, else None."""
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[1] if arg.startswith("--suite=") else argv[i + 1] if arg == "--suite" and \
            i + 1 < len(argv) else None
        if name in DELEGATED:
            return name, argv[:i] + argv[i + (1 if "=" in arg else 2):]
    return None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time rnnfused against torch.nn (cuDNN on a GPU, oneDNN/native on a CPU), torch's "
                    "non-cuDNN CUDA path, the reference loop and FlashRNN (when installed). Every "
                    "implementation is checked against an fp64 reference first; a wrong one is "
                    "refused, not timed.",
        epilog="suites:\n" + "\n".join(f"  {k:<13} {v.description}" for k, v in SUITES.items()) + "\n" +
               "\n".join(f"  {k:<13} {v}; its own options" for k, v in DELEGATED.items()) +
               "\n\nThe table and the plots give each time as a ratio to torch.nn's in the same case "
               "(x torch; below 1 is faster), the median with the 20th-80th percentiles.")
    parser.add_argument("--suite", choices=list(SUITES) + list(DELEGATED), default="default",
                        help="what to run (default: %(default)s)")
    parser.add_argument("--configs", help="';'-separated config names (e.g. 'fastrnns;deep4') or custom specs "
                                          "like 'T100,B64,I512,H512,L2,bi,packed' (overrides the suite's)")
    parser.add_argument("--cells", help=f"comma-separated subset of {','.join(CELLS)} (overrides the suite's)")
    parser.add_argument("--dtypes", help=f"comma-separated subset of {','.join(DTYPES)} (overrides the suite's)")
    parser.add_argument("--modes", default="fwd,fwdbwd",
                        help="fwd (no_grad forward) and/or fwdbwd (forward + backward of ones); default %(default)s")
    parser.add_argument("--impls", help=f"comma-separated subset of {','.join(impls.IMPLEMENTATIONS)} "
                                        "(default: all but the reference on a GPU, all on a CPU); 'torch' "
                                        "is what the ratios are relative to")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, help="untimed runs per implementation (default 5 GPU, 2 CPU)")
    parser.add_argument("--repeats", type=int, help="timed runs per implementation (default 30 GPU, 9 CPU)")
    parser.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                        help="TF32 for fp32: torch's defaults (matmuls off, cuDNN on; as the cuDNN baselines), "
                             "or on/off for both. rnnfused follows the matmul switch")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="leave torch.backends.cudnn.benchmark off (the cuDNN baselines turned it on)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--out", help="folder for results.json/results.csv/plots (default: results/<time>)")
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib plots")
    return parser


def _choices(text, allowed, what):
    """The comma-separated names in `text`, each checked against `allowed` (SystemExit
    naming the unknown ones and the choices)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(allowed)}")
    return names


def plan(args, device):
    """(configs, cells, dtypes) of the suite, with the command line's overrides applied."""
    gpu = device == "cuda"
    suite = SUITES[args.suite]
    config_list = suite.configs(device)
    cells = list(suite.gpu_cells if gpu else suite.cpu_cells)
    dtypes = list(suite.gpu_dtypes if gpu else suite.cpu_dtypes)
    if args.configs:
        try:
            config_list = [configs.parse(n) for n in args.configs.split(";")]
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if args.cells:
        cells = _choices(args.cells, CELLS, "cell")
    if args.dtypes:
        dtypes = _choices(args.dtypes, list(DTYPES), "dtype")
    return config_list, cells, [DTYPES[d] for d in dtypes]


def implementations(args, device):
    """The implementation names to run: --impls checked against IMPLEMENTATIONS, or the
    default (all; without the slow reference loop on a GPU)."""
    if args.impls:
        return _choices(args.impls, list(impls.IMPLEMENTATIONS), "implementation")
    return [name for name in impls.IMPLEMENTATIONS if not (device == "cuda" and name == "reference")]


def progress(cases, enabled):
    """Iterates over `cases`, showing progress on stderr: a tqdm bar when tqdm is installed,
    else one line per case."""
    if not enabled:
        yield from cases
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for index, case in enumerate(cases, 1):
            print(f"[{index}/{len(cases)}] {describe(case)}", file=sys.stderr, flush=True)
            yield case
        return
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(describe(case))
        yield case


def describe(case):
    config, cell, dtype, mode = case
    return f"{config.name} {cell} {str(dtype).replace('torch.', '')} {mode}"


def tf32_enabled():
    """(matmul, cuDNN) TF32 switches, read through torch's newer fp32_precision API where it
    exists: after a set through that API torch refuses reads through the legacy allow_tf32."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32", cudnn.rnn.fp32_precision == "tf32"
    return matmul.allow_tf32, cudnn.allow_tf32


def set_tf32(on):
    """Both switches on or off, through the newer API where it exists."""
    precision = "tf32" if on else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def environment(device):
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench"] + sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else rnnfused._build.cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "rnnfused_backends": list(rnnfused.backends()),
        "rnnfused_build": {k: v for k, v in rnnfused._build.config().items() if k not in ("torch", "CPU", "GPU")},
        "tf32_matmul": tf32_enabled()[0],
        "tf32_cudnn": tf32_enabled()[1],
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    delegated = _delegated(argv)
    if delegated is not None:
        import importlib
        name, rest = delegated
        return importlib.import_module(f"bench.{name}").main(rest)
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    gpu = device == "cuda"
    # Every name is checked before anything runs: a typo must not cost a long run.
    config_list, cells, dtypes = plan(args, device)
    modes = _choices(args.modes, MODES, "mode")
    names = implementations(args, device)
    if args.tf32 != "default":
        set_tf32(args.tf32 == "on")
    if gpu:  # on a CPU cuDNN plays no part (and torch's test utilities forbid setting its flags)
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    repeats = args.repeats if args.repeats is not None else (30 if gpu else 9)
    env = environment(device)
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    cases = [(c, cell, dtype, mode) for c in config_list for cell in cells for dtype in dtypes for mode in modes]
    results = []
    for config, cell, dtype, mode in progress(cases, enabled=not args.no_progress):
        results += harness.run_case(cell, config, dtype, mode, names, device, warmup, repeats,
                                    tf32=any(tf32_enabled()))

    folder = args.out or os.path.join("results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    report.write(results, folder, env)
    written = [os.path.join(folder, "results.json"), os.path.join(folder, "results.csv")]
    print(report.table(results))
    if not args.no_plot:
        title = f"{env['device']}: {args.suite}"
        if args.suite in ("sweep-batch", "sweep-hidden"):
            path, why_not = report.plot(results, folder, "B" if args.suite == "sweep-batch" else "H", title)
        else:
            path, why_not = report.plot_cases(results, folder, title)
        if path:
            written.append(path)
        else:
            print(f"plot skipped: {why_not}")
    print("wrote " + ", ".join(written))
    return 0
