"""rnnfused: fused LSTM / GRU / RNN kernels for PyTorch.

``rnnfused.LSTM``, ``rnnfused.GRU`` and ``rnnfused.RNN`` are drop-in replacements for the
torch.nn classes; :mod:`rnnfused.functional` runs one layer with explicit weights;
:mod:`rnnfused.reference` is the plain time-loop oracle of the equations.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, functional, reference
from .modules import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "functional", "reference", "backends"]
__version__ = "0.1.0"


def backends():
    """The devices this build has kernels for: ``("cpu",)`` or ``("cpu", "cuda")``."""
    return ("cpu", "cuda") if _C.with_cuda else ("cpu",)
