"""Output of a benchmark run: a table on stdout, JSON and CSV files, speed-up plots."""

import csv
import dataclasses
import json
import os

FIELDS = ["config", "shape", "cell", "dtype", "mode", "impl", "kernel", "status", "ms", "us_per_step", "ratio",
          "max_error", "peak_mb"]


def _fmt(value, spec, width):
    return format("-" if value is None else format(value, spec), f">{width}")


def table(results):
    """One row per implementation and case (ratio = time / time of torch.nn in the same case;
    below 1 is faster); implementations skipped for a reason are listed once underneath."""
    header = f"{'config':<16} {'shape':<26} {'cell':<8} {'dtype':<9} {'mode':<7} {'impl':<19} {'kernel':<10} " \
             f"{'ms':>9} {'us/step':>8} {'x torch':>8} {'max err':>9} {'peak MB':>8}  status"
    lines = [header, "-" * len(header)]
    skipped = {}
    for r in results:
        if r.status.startswith("skipped"):
            skipped.setdefault((r.impl, r.status), 0)
            skipped[(r.impl, r.status)] += 1
            continue
        status = "" if r.status == "ok" else r.status
        kernel = (r.kernel or "-")[:10]
        lines.append(f"{r.config:<16} {r.shape:<26} {r.cell:<8} {r.dtype:<9} {r.mode:<7} {r.impl:<19} {kernel:<10} "
                     f"{_fmt(r.ms, '.3f', 9)} {_fmt(r.us_per_step, '.1f', 8)} {_fmt(r.ratio, '.2f', 8)} "
                     f"{_fmt(r.max_error, '.1e', 9)} {_fmt(r.peak_mb, '.1f', 8)}  {status}")
    for (impl, status), count in skipped.items():
        lines.append(f"{impl} {status} ({count} cases)")
    return "\n".join(lines)


def write(results, folder, environment):
    """results.json (environment + every result with its individual times) and results.csv."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"environment": environment, "results": [dataclasses.asdict(r) for r in results]}, f,
                  indent=1)
    with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: getattr(r, k) for k in FIELDS})


def plot(results, folder, x_name, title):
    """Speed-up of rnnfused over torch.nn (torch ms / rnnfused ms) against `x_name` (B or H),
    one line per (cell, dtype, mode). Returns the file written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = {}
    for r in results:
        if r.impl == "rnnfused" and r.ratio:
            value = int(r.shape.split(f" {x_name}")[1].split()[0]) if f" {x_name}" in r.shape else None
            if value is not None:
                lines.setdefault(f"{r.cell} {r.dtype} {r.mode}", []).append((value, 1.0 / r.ratio))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel({"B": "batch size", "H": "hidden size (= input size)"}[x_name])
    ax.set_ylabel("speed-up over torch.nn (x)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(folder, f"speedup_vs_{'batch' if x_name == 'B' else 'hidden'}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cases(results, folder, title):
    """Bar chart of rnnfused's speed-up over torch.nn (torch ms / rnnfused ms) for every case
    that has both. Returns the file written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = [(f"{r.config} {r.cell} {r.dtype} {r.mode}", 1.0 / r.ratio) for r in results
             if r.impl == "rnnfused" and r.ratio]
    if not cases:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(cases) + 1.2))
    labels, speedups = zip(*cases)
    ax.barh(range(len(cases)), speedups, color=["C2" if v >= 1 else "C3" for v in speedups])
    ax.set_yticks(range(len(cases)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("speed-up over torch.nn (x); right of the line is faster")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(folder, "speedup.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
