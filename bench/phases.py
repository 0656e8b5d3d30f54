"""python -m bench.phases: where the persistent kernel's time goes, phase by phase.

Thread 0 of every CTA stamps clock64 right after each CTA barrier of the program
(csrc/persistent/timing.h) and charges the cycles since its previous stamp to: the copy of
h (forward) or dG (backward) from the other CTAs ("exchange"), the tensor-core product and its
epilogue ("mma"), the cell pass ("cell"), the fence of the grid barrier's arrival, which
orders the CTA's stores of the step before it (in a cluster: the push of its slice into the
peers' shared memory; "stores"), what the CTA does between its
arrival and its wait ("window": the saved activations' stores and the next step's input
prefetch, thread 0's share), and the wait for the other CTAs ("barrier"; in a cluster the wait
for the peers' pushes on the CTA's mbarrier; on a plan whose CTAs
each have every unit of their rows, the CTA barrier that replaces the grid barrier, and
"stores" stays zero); begin() and end() once per launch. Each CTA's %globaltimer at its start and end converts its cycles to time.

Printed and written to CSV: microseconds per step of each phase (the mean over CTAs, median
over --repeats launches), begin/end in microseconds per launch, forward and backward, for
fastrnns, latency_b1 and small_b16_h128, LSTM and GRU, fp16/bf16/fp32 (TF32); each case under
every tiling of --tilings (the planner's, the planner's with W in shared memory only, the
planner's with clusters of at most the portable 8 CTAs, the planner's without clusters, stage
2's spread over every SM, one CTA per batch tile, or ROWSxUNITS), and beside each measured row ("fwd", "bwd") the planner's cost-model
estimate of the same phases ("~fwd", "~bwd"; csrc/persistent/plan.h), which these
measurements are meant to calibrate.

Needs a GPU and a build with RNNFUSED_PHASE_TIMING=1 (setup.py); it refuses otherwise and
never prints a number it did not measure."""

import argparse
import csv
import datetime
import itertools
import os
import statistics
import sys

import torch

import rnnfused
from rnnfused import _C
from rnnfused._ops import Cell

from . import configs
from .impls import kernel_setting

CONFIGS = ["fastrnns", "latency_b1", "small_b16_h128"]
CELLS = ["LSTM", "GRU"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STEP_PHASES = ["exchange", "mma", "cell", "stores", "window", "barrier"]
LAUNCH_PHASES = ["begin", "end"]
TILINGS = ["model", "shared_w", "portable", "grid", "spread", "one_cta"]


def tiling_settings(tiling, config):
    """The RNNFUSED_PERSISTENT_* settings (names without the prefix) of a --tilings entry:
    the planner's choice ("model"), its choice with W read from shared memory by every product
    instead of held in registers ("shared_w"), its choice with clusters of at most 8 CTAs
    ("portable": sm_90 allows 16), its choice without thread-block clusters ("grid":
    the grid barrier's plans), stage 2's rule ("spread"), one CTA per batch tile of 16 rows with
    every unit ("one_cta"), or ROWSxUNITS (a cluster where it fits one)."""
    if tiling == "model":
        return {}
    if tiling == "shared_w":
        return {"persistent_held_w": "0"}
    if tiling == "portable":
        return {"persistent_clusters": "8"}
    if tiling == "grid":
        return {"persistent_clusters": "0"}
    if tiling == "spread":
        return {"persistent_spread": "1"}
    if tiling == "one_cta":
        return {"persistent_tiling": f"{min(16, config.B)}x{config.H}"}
    rows, _, units = tiling.partition("x")
    if not (rows.isdigit() and units.isdigit()):
        raise ValueError(f"a tiling is model, shared_w, portable, grid, spread, one_cta or ROWSxUNITS, not {tiling!r}")
    return {"persistent_tiling": tiling}


def why_not():
    """None when phases can be timed here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if "cuda" not in rnnfused.backends():
        return "this build of rnnfused has no CUDA kernels"
    if not getattr(_C, "phase_timing", False):
        return ("this build has no phase timer: rebuild with RNNFUSED_PHASE_TIMING=1, e.g. RNNFUSED_PHASE_TIMING=1 "
                "python setup.py build_ext --build-lib build/phase-timing --build-temp build/phase-timing-tmp "
                "(a separate build: the timer costs a few cycles per phase)")
    return None


def summarize(record):
    """One launch's record (_C.phase_times) -> {phase: microseconds} averaged over its CTAs:
    per step for the step phases, per launch for begin and end; plus "kernel" (per launch,
    from %globaltimer) and "ns_per_cycle"."""
    names = list(_C.phase_names)
    steps = record["steps"]
    if not record["ctas"] or steps <= 0:
        raise ValueError("the record holds no timed launch")
    sums = dict.fromkeys(names + ["kernel", "ns_per_cycle"], 0.0)
    for cta in record["ctas"]:
        clock_begin, clock_end = cta["clock"]
        ns_begin, ns_end = cta["ns"]
        if clock_end <= clock_begin or ns_end <= ns_begin:
            raise ValueError(f"a CTA's record is not a timed launch: clock {cta['clock']}, ns {cta['ns']}")
        ns_per_cycle = (ns_end - ns_begin) / (clock_end - clock_begin)
        for name, cycles in zip(names, cta["cycles"]):
            us = cycles * ns_per_cycle / 1e3
            sums[name] += us / steps if name in STEP_PHASES else us
        sums["kernel"] += (ns_end - ns_begin) / 1e3
        sums["ns_per_cycle"] += ns_per_cycle
    return {k: v / len(record["ctas"]) for k, v in sums.items()}


def time_case(config, cell, dtype, repeats, tiling="model"):
    """({direction: summary} (median over launches), the layer's plan (_C.layer_plan)) for one
    case under one tiling, or a reason it did not run the persistent kernel."""
    torch.manual_seed(0)
    module = getattr(rnnfused, cell)(config.I, config.H).to("cuda", dtype)
    x = torch.randn(config.T, config.B, config.I, device="cuda", dtype=dtype, requires_grad=True)
    with kernel_setting("persistent", **tiling_settings(tiling, config)):
        try:
            kernels = {c.kernel for c in rnnfused.explain(module, x)}
            plan = _C.layer_plan(int(Cell[cell]), config.T, config.H, config.B, dtype, "cuda")
        except RuntimeError as error:
            return f"not persistent: {str(error).splitlines()[0]}"
        if kernels != {"persistent"}:
            return f"not persistent: {', '.join(sorted(kernels))}"
        runs = {"forward": [], "backward": []}
        for i in range(repeats + 1):  # the first launch warms up
            before = {d: _C.phase_times(d == "backward")["launches"] for d in runs}
            output = module(x)[0]
            output.backward(torch.ones_like(output))
            torch.cuda.synchronize()
            for direction in runs:
                record = _C.phase_times(direction == "backward")
                if record["launches"] != before[direction] + 1:
                    return f"the {direction} persistent kernel did not run (refused launch?)"
                if i > 0:
                    runs[direction].append(summarize(record))
    return {d: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for d, rs in runs.items()}, plan


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated (default %(default)s)")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated (default %(default)s)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated (default %(default)s)")
    parser.add_argument("--tilings", default=",".join(TILINGS),
                        help="comma-separated: model, shared_w, portable, grid, spread, one_cta or ROWSxUNITS "
                        "(default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed launches per case (default %(default)s)")
    parser.add_argument("--out", help="folder for phases.csv (default results/phases-<time>)")
    args = parser.parse_args(argv)
    reason = why_not()
    if reason:
        print(f"bench.phases: refusing to run: {reason}", file=sys.stderr)
        return 2
    # fp32 runs the persistent kernel only with TF32 (its products are TF32).
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    out = args.out or os.path.join("results", "phases-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    rows = []
    print(f"{torch.cuda.get_device_name()}: persistent kernel, us per step (begin, end, kernel: us per launch), "
          f"mean over CTAs, median of {args.repeats} launches; ~fwd/~bwd: the planner's cost model (an estimate)")
    header = ["config", "cell", "dtype", "tiling", "dir"] + LAUNCH_PHASES + STEP_PHASES + ["step", "kernel"]
    print("{:<16}{:<6}{:<10}{:<22}{:<6}".format(*header[:5]) + "".join(f"{h:>10}" for h in header[5:]))
    for config_name, cell, dtype_name, tiling in itertools.product(
            args.configs.split(","), args.cells.split(","), args.dtypes.split(","), args.tilings.split(",")):
        config = configs.NAMED[config_name]
        case = dict(config=config_name, cell=cell, dtype=dtype_name, tiling=tiling)
        label = f"{config_name:<16}{cell:<6}{dtype_name:<10}"
        result = time_case(config, cell, DTYPES[dtype_name], args.repeats, tiling)
        if isinstance(result, str):
            print(f"{label}{tiling:<22}{'-':<6}{result}")
            rows.append(dict(case, status=result))
            continue
        measured, plan = result
        shape = f"{tiling}:{plan['ctas']}={plan['unit_tiles']}x{plan['units']}u,{plan['row_tiles']}x{plan['rows']}r"
        for direction, summary in measured.items():
            step = sum(summary[p] for p in STEP_PHASES)
            values = [summary[p] for p in LAUNCH_PHASES + STEP_PHASES] + [step, summary["kernel"]]
            estimate = {p: plan["estimate"][direction][p] / 1e3 for p in STEP_PHASES}
            print(f"{label}{shape:<22}{direction[:3]:<6}" + "".join(f"{v:>10.3f}" for v in values))
            print(f"{label}{shape:<22}{'~' + direction[:3]:<6}{'':>20}"
                  + "".join(f"{estimate[p]:>10.3f}" for p in STEP_PHASES) + f"{sum(estimate.values()):>10.3f}")
            rows.append(dict(case, T=config.T, B=config.B, I=config.I, H=config.H, ctas=plan["ctas"],
                             units=plan["units"], rows=plan["rows"], direction=direction, status="ok",
                             **{f"{p}_us": summary[p] for p in LAUNCH_PHASES + STEP_PHASES},
                             step_us=step, kernel_us=summary["kernel"], ns_per_cycle=summary["ns_per_cycle"],
                             **{f"model_{p}_us": estimate[p] for p in STEP_PHASES},
                             model_step_us=sum(estimate.values())))
    fields = list(dict.fromkeys(k for row in rows for k in row))
    path = os.path.join(out, "phases.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
