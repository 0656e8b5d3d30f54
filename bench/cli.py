"""python -m bench: compare rnnfused with torch.nn and the other implementations."""

import argparse
import datetime
import os
import sys

import torch

import rnnfused

from . import configs, harness, impls, report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
CELLS = ["LSTM", "GRU", "RNN", "RNN_RELU"]

# suite -> (configs for a device, cells, dtypes on GPU, dtypes on CPU)
SUITES = {
    "default": "the baselines' six configs on a GPU (LSTM/GRU, fp16/bf16/fp32); CPU-sized configs on a CPU",
    "baselines": "the six configs of ../shared/baselines, every cell and dtype measured there",
    "gpu-check": "fastrnns, latency_b1 and small_b16_h128 for LSTM and GRU in fp16, bf16, fp32 (make gpu-check)",
    "sweep-batch": "batch sizes around a base shape, with a plot",
    "sweep-hidden": "hidden sizes around a base shape, with a plot",
    "sweep-seq": "sequence lengths around a base shape",
    "packed": "variable lengths in [T/3, T] as PackedSequence, next to the padded run",
    "cells": "a Python loop of T steps of LSTMCell / GRUCell / RNNCell against torch.nn's cells",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time rnnfused against torch.nn (cuDNN on a GPU, oneDNN/native on a CPU), torch's "
                    "non-cuDNN CUDA path, the reference loop and FlashRNN (when installed). Every "
                    "implementation is checked against an fp64 reference first; a wrong one is "
                    "refused, not timed.",
        epilog="suites:\n" + "\n".join(f"  {k:<13} {v}" for k, v in SUITES.items()))
    parser.add_argument("--suite", choices=SUITES, default="default", help="what to run (default: %(default)s)")
    parser.add_argument("--configs", help="';'-separated config names (e.g. 'fastrnns;deep4') or custom specs "
                                          "like 'T100,B64,I512,H512,L2,bi,packed' (overrides the suite's)")
    parser.add_argument("--cells", help=f"comma-separated subset of {','.join(CELLS)} (overrides the suite's)")
    parser.add_argument("--dtypes", help=f"comma-separated subset of {','.join(DTYPES)} (overrides the suite's)")
    parser.add_argument("--modes", default="fwd,fwdbwd",
                        help="fwd (no_grad forward) and/or fwdbwd (forward + backward of ones); default %(default)s")
    parser.add_argument("--impls", help=f"comma-separated subset of {','.join(impls.IMPLEMENTATIONS)} "
                                        "(default: all but the reference on a GPU, all on a CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, help="untimed runs per implementation (default 5 GPU, 2 CPU)")
    parser.add_argument("--repeats", type=int, help="timed runs per implementation (default 30 GPU, 9 CPU)")
    parser.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                        help="TF32 for fp32: torch's defaults (matmuls off, cuDNN on; as the baselines), "
                             "or on/off for both. rnnfused follows the matmul switch")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="leave torch.backends.cudnn.benchmark off (the baselines turned it on)")
    parser.add_argument("--out", help="folder for results.json/results.csv/plots (default: results/<time>)")
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib plots")
    return parser


def plan(args, device):
    """(configs, cells, dtypes) of the suite, with the command line's overrides applied."""
    gpu = device == "cuda"
    suite = args.suite
    if suite in ("default", "baselines"):
        config_list = configs.BASELINES if gpu else configs.CPU_DEFAULTS
    elif suite == "gpu-check":
        config_list = [configs.NAMED[name] for name in ("fastrnns", "latency_b1", "small_b16_h128")]
    elif suite == "cells":
        config_list = configs.CELL_LOOPS if gpu else configs.CPU_CELL_LOOPS
    elif suite == "packed":
        base = configs.NAMED["fastrnns" if gpu else "cpu_fastrnns"]
        config_list = [base, configs.Config(base.name + "_packed", base.T, base.B, base.I, base.H, packed=True)]
    else:
        config_list = configs.sweep(suite.split("-")[1], device)
    cells = ["LSTM", "GRU", "RNN"] if suite in ("baselines", "cells") or not gpu else ["LSTM", "GRU"]
    dtypes = ["float16", "bfloat16", "float32"] if gpu else ["float32"]
    if args.configs:
        config_list = [configs.parse(n) for n in args.configs.split(";")]
    if args.cells:
        cells = args.cells.split(",")
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    for name in cells:
        if name not in CELLS:
            raise SystemExit(f"unknown cell {name!r}; choose from {', '.join(CELLS)}")
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return config_list, cells, [DTYPES[d] for d in dtypes]


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
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    gpu = device == "cuda"
    if args.tf32 != "default":
        set_tf32(args.tf32 == "on")
    torch.backends.cudnn.benchmark = gpu and not args.no_cudnn_benchmark
    config_list, cells, dtypes = plan(args, device)
    modes = args.modes.split(",")
    names = args.impls.split(",") if args.impls else [n for n in impls.IMPLEMENTATIONS if not (gpu and n == "reference")]
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    repeats = args.repeats if args.repeats is not None else (30 if gpu else 9)
    env = environment(device)
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    cases = [(c, cell, dtype, mode) for c in config_list for cell in cells for dtype in dtypes for mode in modes]
    try:
        from tqdm import tqdm
        progress = tqdm(cases, desc="bench", file=sys.stderr, leave=False)
    except ImportError:
        progress = cases
    results = []
    for config, cell, dtype, mode in progress:
        results += harness.run_case(cell, config, dtype, mode, names, device, warmup, repeats,
                                    tf32=any(tf32_enabled()))

    folder = args.out or os.path.join("results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    report.write(results, folder, env)
    written = [os.path.join(folder, "results.json"), os.path.join(folder, "results.csv")]
    if not args.no_plot:
        title = f"{env['device']}: {args.suite}"
        if args.suite in ("sweep-batch", "sweep-hidden"):
            path = report.plot(results, folder, "B" if args.suite == "sweep-batch" else "H", title)
        else:
            path = report.plot_cases(results, folder, title)
        if path:
            written.append(path)
    print(report.table(results))
    print("wrote " + ", ".join(written))
    return 0
