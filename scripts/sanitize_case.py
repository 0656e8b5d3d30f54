"""A small run of every CUDA kernel for compute-sanitizer: each cell and extra (GRU in both
forms, projection, cell_clip, grad_clip), training (forward + backward) and no_grad
inference, padded and packed input, both directions, in fp32, fp64, fp16 and bf16 on the
stepwise kernels; then the same cells (no projection) in fp16, bf16 and fp32 (TF32) on the
persistent kernel, at H = 6 (one CTA with every unit, no grid barrier; element-by-element
copies, one K part) and at H = 64 on a plan that takes the persistent kernel's other paths:
16-byte row copies, K split over warps forward and backward, the backward's dG tile fewer
gates at a time than the cell has, and 8 CTAs with grid barriers (RNNFUSED_PERSISTENT_SMS,
_SMEM_KB and _SPREAD shape the plan; it exits non-zero if the planner no longer gives those
paths).
`--persistent-only` runs the persistent part alone (racecheck, synccheck).
Exits non-zero when there is no CUDA device: a sanitizer run on the CPU checks nothing."""

import os
import sys

import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused import _C

if not (torch.cuda.is_available() and "cuda" in rnnfused.backends()):
    sys.exit("sanitize_case: no CUDA device or no CUDA kernels in this build; nothing to check")

CASES = [("LSTM", {}), ("LSTM", {"proj_size": 3, "cell_clip": 0.5, "grad_clip": 0.1}), ("GRU", {}),
         ("GRU", {"reset_after": False, "grad_clip": 0.1}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]


def run(kernel, dtypes, cases):
    os.environ["RNNFUSED_KERNEL"] = kernel
    torch.backends.cuda.matmul.allow_tf32 = kernel == "persistent"
    for dtype in dtypes:
        for name, kwargs in cases:
            module = getattr(rnnfused, name)(5, 6, bidirectional=True, **kwargs).to("cuda", dtype)
            x = torch.randn(4, 3, 5, device="cuda", dtype=dtype, requires_grad=True)
            output, _ = module(x)
            output.float().sum().backward()
            seqs = [torch.randn(n, 5, device="cuda", dtype=dtype, requires_grad=True) for n in (4, 1, 3)]
            packed_output, _ = module(pack_sequence(seqs, enforce_sorted=False))
            packed_output.data.float().sum().backward()
            with torch.no_grad():
                module(x)
                module(pack_sequence(seqs, enforce_sorted=False))
            torch.cuda.synchronize()
            print(f"ran {kernel} {name} {kwargs} {dtype}")


# The larger persistent case: H = 64, B = 20 on 8 CTAs, and per cell and dtype the least shared
# memory per block under which the plan still fits, splits K forward and chunks dG.
LARGE = dict(steps=3, batch=20, inputs=8, hidden=64, sms=8)
CELL_NUMBERS = {("LSTM", False): 0, ("GRU", False): 1, ("GRU", True): 2, ("RNN", False): 3}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def provoking_smem_kb(name, kwargs, dtype):
    major, minor = torch.cuda.get_device_capability()
    cell = CELL_NUMBERS[name, kwargs.get("reset_after") is False]
    for kb in range(8, 228, 2):
        plan = _C.plan(cell, LARGE["hidden"], LARGE["hidden"], LARGE["batch"], dtype, True, LARGE["sms"], kb * 1024,
                       major * 10 + minor, True, False, True)
        if plan["persistent"] and plan["split_fwd"] > 1 and (GATES[name] == 1 or plan["chunk_gates"] < GATES[name]):
            assert plan["ctas"] > 1 and plan["split_bwd"] > 1, plan
            return kb, plan
    sys.exit(f"sanitize_case: no shared-memory size gives {name} {kwargs} {dtype} a plan with split K and dG chunks")


def run_large(dtypes, cases):
    os.environ["RNNFUSED_KERNEL"] = "persistent"
    torch.backends.cuda.matmul.allow_tf32 = True
    steps, batch, inputs, hidden = LARGE["steps"], LARGE["batch"], LARGE["inputs"], LARGE["hidden"]
    for dtype in dtypes:
        for name, kwargs in cases:
            kb, plan = provoking_smem_kb(name, kwargs, dtype)
            os.environ["RNNFUSED_PERSISTENT_SMS"] = str(LARGE["sms"])
            os.environ["RNNFUSED_PERSISTENT_SMEM_KB"] = str(kb)
            os.environ["RNNFUSED_PERSISTENT_SPREAD"] = "1"
            module = getattr(rnnfused, name)(inputs, hidden, bidirectional=True, **kwargs).to("cuda", dtype)
            x = torch.randn(steps, batch, inputs, device="cuda", dtype=dtype, requires_grad=True)
            assert {c.kernel for c in rnnfused.explain(module, x)} == {"persistent"}
            output, _ = module(x)
            output.float().sum().backward()
            seqs = [torch.randn(1 + i % steps, inputs, device="cuda", dtype=dtype, requires_grad=True)
                    for i in range(batch)]
            packed_output, _ = module(pack_sequence(seqs, enforce_sorted=False))
            packed_output.data.float().sum().backward()
            torch.cuda.synchronize()
            for knob in ("SMS", "SMEM_KB", "SPREAD"):
                del os.environ["RNNFUSED_PERSISTENT_" + knob]
            print(f"ran persistent {name} {kwargs} {dtype} H{hidden} B{batch} at {kb} KB: {plan['reason']}")


if "--persistent-only" not in sys.argv:
    run("stepwise", (torch.float32, torch.float64, torch.float16, torch.bfloat16), CASES)
run("persistent", (torch.float16, torch.bfloat16, torch.float32), [c for c in CASES if "proj_size" not in c[1]])
# bf16 takes fp16's paths (2-byte elements, the same WMMA shape): fp16 and fp32 (TF32) here.
run_large((torch.float16, torch.float32), [c for c in CASES if "proj_size" not in c[1]])
