"""rnnfused: fused LSTM / GRU / RNN kernels for PyTorch.

``rnnfused.LSTM``, ``rnnfused.GRU`` and ``rnnfused.RNN`` are drop-in replacements for the
torch.nn classes; ``rnnfused.convert(model)`` swaps them into an existing model;
:mod:`rnnfused.functional` runs one layer with explicit weights;
:mod:`rnnfused.reference` is the plain time-loop oracle of the equations.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, functional, reference
from .convert import convert
from .modules import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "convert", "functional", "reference", "backends"]
__version__ = "0.1.0"


def backends():
    """The devices this build has kernels for: ``("cpu",)`` or ``("cpu", "cuda")``."""
    return ("cpu", "cuda") if _C.with_cuda else ("cpu",)
