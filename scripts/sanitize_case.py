"""A small run of every CUDA kernel for compute-sanitizer: each cell and extra (GRU in both
forms, projection, cell_clip, grad_clip), training (forward + backward) and no_grad
inference, padded and packed input, both directions, in fp32, fp64, fp16 and bf16 on the
stepwise kernels; then the same cells (no projection) in fp16, bf16 and fp32 (TF32) on the
persistent kernel. `--persistent-only` runs the second part alone (racecheck, synccheck).
Exits non-zero when there is no CUDA device: a sanitizer run on the CPU checks nothing."""

import os
import sys

import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused

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


if "--persistent-only" not in sys.argv:
    run("stepwise", (torch.float32, torch.float64, torch.float16, torch.bfloat16), CASES)
run("persistent", (torch.float16, torch.bfloat16, torch.float32), [c for c in CASES if "proj_size" not in c[1]])
