"""A small run of every CUDA kernel for compute-sanitizer: each cell and extra (GRU in both
forms, projection, cell_clip, grad_clip), training (forward + backward) and no_grad
inference, padded and packed input, both directions, in fp32, fp64, fp16 and bf16.
Exits non-zero when there is no CUDA device: a sanitizer run on the CPU checks nothing."""

import sys

import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused

if not (torch.cuda.is_available() and "cuda" in rnnfused.backends()):
    sys.exit("sanitize_case: no CUDA device or no CUDA kernels in this build; nothing to check")

CASES = [("LSTM", {}), ("LSTM", {"proj_size": 3, "cell_clip": 0.5, "grad_clip": 0.1}), ("GRU", {}),
         ("GRU", {"reset_after": False, "grad_clip": 0.1}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for name, kwargs in CASES:
        module = getattr(rnnfused, name)(5, 6, num_layers=2, bidirectional=True, **kwargs).to("cuda", dtype)
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
        print(f"ran {name} {kwargs} {dtype}")
