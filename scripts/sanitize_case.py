"""A small run of every CUDA kernel for compute-sanitizer: each cell, forward and backward,
padded and packed, both directions, LSTM with projection, fp32 and fp16, GRU in both forms."""

import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused

device = "cuda" if torch.cuda.is_available() else "cpu"
cases = [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {}), ("GRU", {"reset_after": False}), ("RNN", {}),
         ("RNN", {"nonlinearity": "relu"})]
for dtype in (torch.float32, torch.float16):
    for name, kwargs in cases:
        module = getattr(rnnfused, name)(5, 6, num_layers=2, bidirectional=True, **kwargs).to(device, dtype)
        x = torch.randn(4, 3, 5, device=device, dtype=dtype, requires_grad=True)
        output, _ = module(x)
        output.float().sum().backward()
        seqs = [torch.randn(n, 5, device=device, dtype=dtype, requires_grad=True) for n in (4, 1, 3)]
        packed_output, _ = module(pack_sequence(seqs, enforce_sorted=False))
        packed_output.data.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"ran {name} {kwargs} {dtype}")
