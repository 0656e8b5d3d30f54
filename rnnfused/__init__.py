"""rnnfused: fused LSTM / GRU / RNN kernels for PyTorch.

``rnnfused.LSTM``, ``rnnfused.GRU`` and ``rnnfused.RNN`` (and the single-step
``LSTMCell``, ``GRUCell``, ``RNNCell``) are drop-in replacements for the torch.nn classes; ``rnnfused.convert(model)`` swaps them into an existing model;
:mod:`rnnfused.functional` runs one layer with explicit weights;
:mod:`rnnfused.reference` is the plain time-loop oracle of the equations.
"""

import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _build

__version__ = "0.1.0"

try:
    from . import _C
except ImportError as error:  # most often: torch changed since the build
    raise ImportError(_build.load_failure_message(error)) from error
if _build.version_mismatch():
    warnings.warn(_build.version_mismatch(), stacklevel=2)

from . import decompositions, functional, reference, regularisers  # noqa: E402,F401
from ._build import show_config  # noqa: E402
from .cells import GRUCell, LSTMCell, RNNCell  # noqa: E402
from .convert import convert  # noqa: E402
from .explain_model import explain  # noqa: E402
from .memory import cpu_cache_stats, empty_cache  # noqa: E402
from .modules import GRU, LSTM, RNN  # noqa: E402
from . import _interop  # noqa: E402

_interop.install()

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "explain", "empty_cache", "cpu_cache_stats", "functional", "reference", "regularisers", "backends", "show_config"]


def backends():
    """The devices this build has kernels for: ``("cpu",)`` or ``("cpu", "cuda")``."""
    return ("cpu", "cuda") if _C.with_cuda else ("cpu",)
