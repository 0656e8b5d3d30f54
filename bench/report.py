"""Output of a benchmark run: a table on stdout, JSON and CSV files, plots.

One convention throughout: a time is given as its ratio to torch.nn's time in the same
case ("x torch"; below 1 is faster), in the table, the files and the plots."""

import csv
import dataclasses
import json
import os

FIELDS = ["config", "shape", "cell", "dtype", "mode", "impl", "kernel", "status", "ms", "p20_ms", "p80_ms",
          "us_per_step", "ratio", "max_error", "worst", "peak_mb"]


def _fmt(value, spec, width):
    return format("-" if value is None else format(value, spec), f">{width}")


def table(results):
    """One row per implementation and case: the median time with its 20th-80th percentiles,
    the time per step, the ratio to torch.nn's median in the same case (below 1 is faster),
    the largest error of the correctness check; implementations skipped for a reason are
    listed once underneath."""
    header = f"{'config':<16} {'shape':<26} {'cell':<8} {'dtype':<9} {'mode':<7} {'impl':<19} {'kernel':<10} " \
             f"{'ms':>9} {'p20-p80 ms':>17} {'us/step':>8} {'x torch':>8} {'max err':>9} {'peak MB':>8}  status"
    lines = [header, "-" * len(header)]
    skipped = {}
    for r in results:
        if r.status.startswith("skipped"):
            skipped.setdefault((r.impl, r.status), 0)
            skipped[(r.impl, r.status)] += 1
            continue
        status = "" if r.status == "ok" else r.status
        kernel = (r.kernel or "-")[:10]
        spread = "-" if r.p20_ms is None else f"{r.p20_ms:.3f}-{r.p80_ms:.3f}"
        lines.append(f"{r.config:<16} {r.shape:<26} {r.cell:<8} {r.dtype:<9} {r.mode:<7} {r.impl:<19} {kernel:<10} "
                     f"{_fmt(r.ms, '.3f', 9)} {spread:>17} {_fmt(r.us_per_step, '.1f', 8)} {_fmt(r.ratio, '.2f', 8)} "
                     f"{_fmt(r.max_error, '.1e', 9)} {_fmt(r.peak_mb, '.1f', 8)}  {status}")
    for (impl, status), count in skipped.items():
        lines.append(f"{impl} {status} ({count} cases)")
    lines.append("x torch: median time / torch.nn's median time in the same case; below 1 is faster")
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


def _pyplot():
    """matplotlib.pyplot with a file backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


NO_MATPLOTLIB = "matplotlib is not installed (pip install matplotlib)"
RATIO_LABEL = "time / torch.nn's time (x torch); below 1 is faster"


def plot(results, folder, x_name, title):
    """rnnfused's time ratio to torch.nn against `x_name` (B or H), one line per (cell,
    dtype, mode). Returns (file written, None) or (None, why not)."""
    plt = _pyplot()
    if plt is None:
        return None, NO_MATPLOTLIB
    lines = {}
    for r in results:
        if r.impl == "rnnfused" and r.ratio:
            value = int(r.shape.split(f" {x_name}")[1].split()[0]) if f" {x_name}" in r.shape else None
            if value is not None:
                lines.setdefault(f"{r.cell} {r.dtype} {r.mode}", []).append((value, r.ratio))
    if not lines:
        return None, "no rnnfused result with a torch.nn time to compare with"
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel({"B": "batch size", "H": "hidden size (= input size)"}[x_name])
    ax.set_ylabel(RATIO_LABEL, fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(folder, f"time_ratio_vs_{'batch' if x_name == 'B' else 'hidden'}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None


def plot_cases(results, folder, title):
    """Bar chart of rnnfused's time ratio to torch.nn for every case that has both.
    Returns (file written, None) or (None, why not)."""
    plt = _pyplot()
    if plt is None:
        return None, NO_MATPLOTLIB
    cases = [(f"{r.config} {r.cell} {r.dtype} {r.mode}", r.ratio) for r in results if r.impl == "rnnfused" and r.ratio]
    if not cases:
        return None, "no rnnfused result with a torch.nn time to compare with"
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(cases) + 1.2))
    labels, ratios = zip(*cases)
    ax.barh(range(len(cases)), ratios, color=["C2" if v <= 1 else "C3" for v in ratios])
    ax.set_yticks(range(len(cases)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("time / torch.nn's time (x torch); left of the line is faster")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(folder, "time_ratio.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None
