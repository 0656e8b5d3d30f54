"""Drop-in replacements for ``torch.nn.LSTMCell``, ``torch.nn.GRUCell`` and ``torch.nn.RNNCell``:
one time step on the fused kernels (the sequence layers' operators with T = 1: one
input product, one hidden product and one fused pointwise pass, forward and backward).

Same constructor, parameters (names, shapes, order, initialisation), state_dict,
extra_repr, forward signature, unbatched input, outputs and errors as torch.nn. Extras,
keyword-only and off by default: ``grad_clip`` (every cell), ``cell_clip`` (LSTMCell),
``reset_after=False`` (GRUCell, the Cho et al. 2014 form) and ``zoneout`` (every cell; see
:mod:`rnnfused.regularisers`). The sequence layers' other regularisers act once per sequence
(one mask for all its steps), which a cell, called once per step, cannot know: use the layers.
"""

import math

import torch
from torch import nn
from torch.nn import init

from . import dispatch
from . import regularisers as _regularisers
from .functional import Cell, _clip_value, autocast_result_dtypes, check_resets, run_layer, step_flags
from .modules import _check_devices, layer_options, script_refusal

__all__ = ["RNNCellBase", "RNNCell", "LSTMCell", "GRUCell"]

# torch.nn's cell of each of ours (the name autocast_result_dtypes takes) and its op (cuDNN's
# choice runs it, as torch.nn would).
_TORCH_CELL_NAMES = {Cell.LSTM: "LSTMCell", Cell.GRU: "GRUCell", Cell.GRU_CHO: "GRUCell", Cell.RNN_TANH: "RNNCell",
                     Cell.RNN_RELU: "RNNCell"}
_TORCH_CELL_OPS = {Cell.GRU: torch._VF.gru_cell, Cell.RNN_TANH: torch._VF.rnn_tanh_cell,
                   Cell.RNN_RELU: torch._VF.rnn_relu_cell}


class RNNCellBase(nn.RNNCellBase):
    """Parameters and checks shared by the cells: ``weight_ih`` [G, I], ``weight_hh`` [G, H],
    ``bias_ih`` and ``bias_hh`` [G] (None without bias), G = gates * hidden_size. A subclass
    of ``torch.nn.RNNCellBase`` (so ``isinstance(rnnfused.LSTMCell(...), nn.LSTMCell)`` holds)
    whose ``__init__`` is not called."""

    __constants__ = ["input_size", "hidden_size", "bias"]

    def __init__(self, input_size, hidden_size, bias, num_chunks, device=None, dtype=None, *, grad_clip=None,
                 zoneout=0.0):
        factory_kwargs = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # not torch.nn.RNNCellBase's: it would create and initialise its own weights
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.grad_clip = grad_clip
        _clip_value(grad_clip, "grad_clip")
        self.zoneout = zoneout
        self.regularisers  # checks zoneout
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def __prepare_scriptable__(self):
        raise script_refusal(self)

    @property
    def regularisers(self):
        """Zoneout as a :class:`rnnfused.regularisers.Regularisers` (absent, as in a cell saved
        before it existed: off)."""
        zoneout = getattr(self, "zoneout", 0.0)
        arguments = (self.mode, 0.0, tuple(zoneout) if isinstance(zoneout, list) else zoneout)
        if torch.compiler.is_compiling():
            return _regularisers.Regularisers.of(*arguments)
        return _regularisers.cached_of(*arguments)

    def _get_name(self):
        # repr tells ours from torch.nn's; a user's subclass keeps its own name.
        name = type(self).__name__
        return f"rnnfused.{name}" if type(self).__module__ == __name__ else name

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        for extra, default in (("grad_clip", None), ("cell_clip", None), ("reset_after", True)):
            if getattr(self, extra, default) is not default:
                s += f", {extra}={getattr(self, extra)}"
        if getattr(self, "zoneout", 0.0):
            s += f", zoneout={self.zoneout}"
        return s

    def reset_parameters(self) -> None:
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every parameter, in registration
        order (the same random draws as torch.nn)."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def _check_input(self, name, input, hx):
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for label, state in hx:
            if state is not None and state.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {state.dim()}D instead")

    def _check_forward(self, input, states):
        """torch.nn's checks of a batched step, with its messages; states: [(label, tensor)]."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for label, state in states:
            if input.size(0) != state.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{label} batch size "
                                   f"{state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got {state.size(1)}, expected "
                                   f"{self.hidden_size}")
            if state.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
                raise RuntimeError(f"hidden{label} dtype ({state.dtype}) does not match input dtype ({input.dtype})")

    def _step(self, cell, input, h, c=None, cell_clip=None, reset=None):
        """One step of a batched input [B, I] on the kernel rnnfused.dispatch chooses (ours,
        torch's own cell op, or the reference equations): (h', c') with c' None but for LSTM.
        reset: bool [B] (a 0-d tensor for unbatched input) or None: rows whose state is replaced
        by zeros before the step (no gradient reaches the given state of those rows)."""
        if reset is not None:
            if not isinstance(reset, torch.Tensor):
                raise TypeError(f"reset must be a bool tensor, got {type(reset).__name__}")
            reset = reset.reshape(1, -1)
        # Each parameter read once: a module attribute costs about a microsecond, and a step of
        # a small cell is a few tens (python -m bench.overhead).
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        _check_devices(input, [h, c], weights)
        weight = weights[0]
        training = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
        choice = dispatch.choose(self, weight, input.size(0), training, reset)
        if choice.kernel == "cudnn":
            if cell == Cell.LSTM:
                return torch._VF.lstm_cell(input, (h, c), *weights)
            return _TORCH_CELL_OPS[cell](input, h, *weights), None
        if choice.kernel == "reference":
            dispatch.warn_reference(choice)
        # The module has checked what recurrent_layer would: run the layer directly.
        options = layer_options(cell, self.bias, False, cell_clip, self.grad_clip, None, True, 1e-5)
        batch = input.size(0)
        flags = None if reset is None else step_flags(1, batch, input.device, resets=check_resets(reset, 1, batch))
        if not self.bias:
            weights = weights[:2]
        masks = None
        regularisers = self.regularisers
        if not regularisers.is_off():
            masks = _regularisers.draw_layer_masks(regularisers, self.training, weights[1], 1, batch,
                                                   self.hidden_size)
            _regularisers.record(_regularisers.CallMasks([masks], []))
        _, h_n, c_n = run_layer(options, input.unsqueeze(0), None, h, c, weights, flags=flags,
                                reference=choice.kernel == "reference", masks=masks)
        c_n = c_n if cell == Cell.LSTM else None
        dtypes = autocast_result_dtypes(_TORCH_CELL_NAMES[cell], input, h.dtype, None if c is None else c.dtype)
        if dtypes is not None:  # torch.nn's result dtypes under CPU autocast (our layer returns the autocast dtype)
            h_n, c_n = h_n.to(dtypes[0]), None if c_n is None else c_n.to(dtypes[1])
        return h_n, c_n


class RNNCell(RNNCellBase, nn.RNNCell):
    r"""An Elman RNN cell, drop-in for :class:`torch.nn.RNNCell`:
    :math:`h' = \tanh(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})` (ReLU with ``nonlinearity='relu'``).

    ``RNNCell(input_size, hidden_size, bias=True, nonlinearity='tanh', device=None, dtype=None,
    *, grad_clip=None, zoneout=0.0)``

    Shapes: input ``(N, H_in)`` or ``(H_in)``; hx ``(N, H)`` or ``(H)`` (zeros if None);
    output h' shaped as hx. ``forward(input, hx=None, reset=None)``: reset, a bool ``(N)``
    (or 0-d) tensor, starts the rows where it is True from zero states (an episode boundary;
    no gradient reaches their hx). grad_clip: clamp the gradient of the pre-activation to
    [-grad_clip, grad_clip] in the backward pass (None: off). zoneout=p (Krueger et al. 2017):
    in training each unit keeps its value of hx with probability p, ``h' = k ⊙ h + (1 - k) ⊙
    h̃`` with k ~ Bernoulli(p) drawn at every call; in eval k = p.
    """

    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None, *,
                 grad_clip=None, zoneout=0.0):
        self.nonlinearity = nonlinearity  # before the base class, which checks zoneout for this mode
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype,
                         grad_clip=grad_clip, zoneout=zoneout)

    @property
    def mode(self):
        return "RNN_RELU" if self.nonlinearity == "relu" else "RNN_TANH"

    def forward(self, input, hx=None, reset=None):
        self._check_input("RNNCell", input, [("hidden", hx)])
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        cells = {"tanh": Cell.RNN_TANH, "relu": Cell.RNN_RELU}
        if self.nonlinearity not in cells:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        self._check_forward(input, [("0", hx)])
        h, _ = self._step(cells[self.nonlinearity], input, hx, reset=reset)
        return h if is_batched else h.squeeze(0)


class GRUCell(RNNCellBase, nn.GRUCell):
    r"""A gated recurrent unit cell, drop-in for :class:`torch.nn.GRUCell`::

        r = σ(W_ir x + b_ir + W_hr h + b_hr),  z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     reset_after=True (torch.nn, cuDNN)
        n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)     reset_after=False (Cho et al. 2014)
        h' = (1 - z) ⊙ n + z ⊙ h

    ``GRUCell(input_size, hidden_size, bias=True, device=None, dtype=None, *, grad_clip=None,
    reset_after=True, zoneout=0.0)``. Shapes and zoneout as :class:`RNNCell`.
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, grad_clip=None,
                 reset_after=True, zoneout=0.0):
        if not isinstance(reset_after, bool):
            raise TypeError(f"reset_after should be of type bool, got: {type(reset_after).__name__}")
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype,
                         grad_clip=grad_clip, zoneout=zoneout)
        self.reset_after = reset_after

    mode = "GRU"

    def forward(self, input, hx=None, reset=None):
        self._check_input("GRUCell", input, [("hidden", hx)])
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        self._check_forward(input, [("0", hx)])
        h, _ = self._step(Cell.GRU if self.reset_after else Cell.GRU_CHO, input, hx, reset=reset)
        return h if is_batched else h.squeeze(0)


class LSTMCell(RNNCellBase, nn.LSTMCell):
    r"""A long short-term memory cell, drop-in for :class:`torch.nn.LSTMCell`::

        i, f, o = σ(W_i* x + b_i* + W_h* h + b_h*),   g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        c' = f ⊙ c + i ⊙ g      (clamped to [-cell_clip, cell_clip] when cell_clip is set)
        h' = o ⊙ tanh(c')

    ``LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None, *, grad_clip=None,
    cell_clip=None, zoneout=0.0)``. Shapes: input ``(N, H_in)`` or ``(H_in)``; hx ``(h, c)`` each
    ``(N, H)`` or ``(H)`` (zeros if None); returns ``(h', c')`` shaped as h and c. zoneout: p
    for both h and c, or ``(p_h, p_c)``, as :class:`RNNCell`'s.
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, grad_clip=None,
                 cell_clip=None, zoneout=0.0):
        _clip_value(cell_clip, "cell_clip")
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype,
                         grad_clip=grad_clip, zoneout=zoneout)
        self.cell_clip = cell_clip

    mode = "LSTM"

    def forward(self, input, hx=None, reset=None):
        self._check_input("LSTMCell", input, [] if hx is None else [(f"hx[{i}]", s) for i, s in enumerate(hx)])
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        elif not isinstance(hx, (tuple, list)):
            # torch.nn hands hx to _VF.lstm_cell, whose argument parser refuses a tensor; unpacking
            # one would take its first two rows as (h, c).
            raise TypeError(f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not "
                            f"{type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        self._check_forward(input, [("0", hx[0]), ("1", hx[1])])
        h, c = self._step(Cell.LSTM, input, hx[0], hx[1], cell_clip=self.cell_clip, reset=reset)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
