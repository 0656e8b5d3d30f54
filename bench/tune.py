"""python -m bench.tune (also ``python -m bench --suite tune``): the measured table behind
``auto``'s choice between our kernels and cuDNN (rnnfused/dispatch.py).

For every key of the table on this GPU (rnnfused.dispatch.table_key: cell, dtype, hidden-size
bucket, batch bucket, one or two layers, directions, training or inference, TF32 as set),
times our kernels (RNNFUSED_KERNEL=ours) against cuDNN (RNNFUSED_KERNEL=cudnn, the op
torch.nn calls) on the same module, side by side, and writes the rows into
rnnfused/kernel_table.json with the card, date, versions and the device-source hash of the
build (rows of other architectures or builds stay). A row decides only for a build whose hash
it names and which ``make gpu-check`` verified (rnnfused/gpu_verified.json). Needs a GPU;
without one it says so and writes nothing.
"""

import argparse
import csv
import datetime
import itertools
import json
import os
import statistics
import sys
import time

import torch

import rnnfused
from rnnfused import dispatch

CELLS = {"LSTM": (rnnfused.LSTM, {}), "GRU": (rnnfused.GRU, {}), "RNN_TANH": (rnnfused.RNN, {})}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HIDDEN = (128, 256, 512, 1024)  # one representative per bucket of dispatch.HIDDEN_BUCKETS
BATCH = (1, 8, 32, 128)  # one per bucket of dispatch.BATCH_BUCKETS
STACKS = ((1, False), (1, True), (2, False), (2, True))  # (layers, bidirectional)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS), help="default: %(default)s")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="default: %(default)s")
    parser.add_argument("--hidden", default=",".join(map(str, HIDDEN)), help="default: %(default)s")
    parser.add_argument("--batch", default=",".join(map(str, BATCH)), help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=32, help="sequence length timed (default %(default)s): short, "
                                                              "so that ours is not credited with long-sequence wins")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per kernel (median; default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per kernel (default %(default)s)")
    parser.add_argument("--tf32", choices=["off", "on"], default="off",
                        help="TF32 for float32 matmuls and cuDNN (rows are keyed by it; default %(default)s)")
    parser.add_argument("--budget", type=float, default=240, help="seconds; stops early, keeping what it measured")
    parser.add_argument("--table", default=str(dispatch.TABLE_FILE), help="the table to update (default: the package's)")
    parser.add_argument("--out", default="results/tune", help="folder for tune.csv (default %(default)s)")
    return parser.parse_args(argv)


def _time_ms(run, warmup, repeats):
    """Median milliseconds of run(), each repeat timed with CUDA events."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _runner(module, x, training, setting):
    def run():
        os.environ["RNNFUSED_KERNEL"] = setting
        if training:
            leaf = x.detach().requires_grad_()
            output = module(leaf)[0]
            output.backward(torch.ones_like(output))
            for p in module.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                module(x)
    return run


def _kernels_of_ours(module, x):
    os.environ["RNNFUSED_KERNEL"] = "ours"
    return "/".join(sorted({choice.kernel for choice in rnnfused.explain(module, x)}))


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() or "cuda" not in rnnfused.backends():
        print("bench.tune: needs a CUDA GPU and a build with the CUDA kernels; nothing measured, nothing written")
        return 1
    device = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    compute_capability = major * 10 + minor
    tf32 = args.tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    card = torch.cuda.get_device_name(device)
    date = datetime.date.today().isoformat()
    built = rnnfused._C.device_source_hash
    saved_setting = os.environ.get("RNNFUSED_KERNEL")
    started = time.monotonic()
    rows, skipped = [], 0
    cases = list(itertools.product(args.cells.split(","), args.dtypes.split(","), map(int, args.hidden.split(",")),
                                   map(int, args.batch.split(",")), STACKS, (False, True)))
    try:
        for cell, dtype_name, hidden, batch, (layers, bidirectional), training in cases:
            if time.monotonic() - started > args.budget:
                skipped += 1
                continue
            cls, kwargs = CELLS[cell]
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            module = cls(hidden, hidden, num_layers=layers, bidirectional=bidirectional, **kwargs).to(device, dtype)
            x = torch.randn(args.steps, batch, hidden, device=device, dtype=dtype)
            key = dispatch.table_key(compute_capability, module.mode, dtype, hidden, batch, layers, bidirectional,
                                     training, tf32)
            ours_ms = _time_ms(_runner(module, x, training, "ours"), args.warmup, args.repeats)
            cudnn_ms = _time_ms(_runner(module, x, training, "cudnn"), args.warmup, args.repeats)
            rows.append({"key": list(key), "ours_ms": round(ours_ms, 4), "cudnn_ms": round(cudnn_ms, 4),
                         "ours_kernel": _kernels_of_ours(module, x), "steps": args.steps, "card": card, "date": date,
                         "device_source_hash": built})
            print(f"{cell:8} {dtype_name:8} H{hidden:<5} B{batch:<4} L{layers} {'bi' if bidirectional else 'uni'} "
                  f"{'fwd+bwd' if training else 'fwd':7} ours {ours_ms:8.3f} ms  cuDNN {cudnn_ms:8.3f} ms  "
                  f"ratio {ours_ms / cudnn_ms:5.2f}  ({rows[-1]['ours_kernel']})", flush=True)
    finally:
        if saved_setting is None:
            os.environ.pop("RNNFUSED_KERNEL", None)
        else:
            os.environ["RNNFUSED_KERNEL"] = saved_setting
    if skipped:
        print(f"bench.tune: out of time after {len(rows)} keys; {skipped} not measured (they stay on cuDNN)")
    _write_table(args.table, rows, {
        "card": card, "date": date, "compute_capability": compute_capability, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "device_source_hash": built,
        "command": "python -m bench.tune " + " ".join(argv if argv is not None else sys.argv[1:]),
        "keys": len(rows), "not_measured": skipped})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "ours_ms", "cudnn_ms", "ratio", "ours_kernel"])
        for row in rows:
            writer.writerow([" ".join(map(str, row["key"])), row["ours_ms"], row["cudnn_ms"],
                             round(row["ours_ms"] / row["cudnn_ms"], 3), row["ours_kernel"]])
    faster = sum(row["ours_ms"] <= dispatch.MARGIN * row["cudnn_ms"] for row in rows)
    print(f"bench.tune: {len(rows)} keys measured, ours faster (by > {1 - dispatch.MARGIN:.0%}) in {faster}; "
          f"table {args.table}, rows {os.path.join(args.out, 'tune.csv')}")
    return 0


def _write_table(path, rows, run):
    """Replaces the table's rows of this architecture and build (for the keys measured now) and
    keeps every other row."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {}
    measured = {(tuple(row["key"]), row["device_source_hash"]) for row in rows}
    kept = [row for row in table.get("rows", []) if (tuple(row["key"]), row.get("device_source_hash")) not in measured]
    table["rows"] = kept + rows
    table["runs"] = table.get("runs", []) + [run]
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
