"""Benchmarks of rnnfused against torch.nn (cuDNN / oneDNN / native), torch's non-cuDNN
CUDA path, the reference time loop and, when installed, FlashRNN. Run `python -m bench
--help`. Timing lives here; correctness lives in tests/."""
