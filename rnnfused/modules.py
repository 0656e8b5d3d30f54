"""Drop-in replacements for ``torch.nn.RNN``, ``torch.nn.LSTM`` and ``torch.nn.GRU``.

Same constructor arguments, validation, attributes, parameter names, shapes, order and
initialisation (the same seed gives the same weights), state_dict, forward signature,
outputs, PackedSequence handling and errors as torch.nn; the recurrence runs on the fused
kernels of :mod:`rnnfused.functional`.

Each class derives from the torch.nn class it replaces (``isinstance(rnnfused.LSTM(...),
nn.LSTM)`` holds, so code that finds ``nn.LSTM`` modules finds ours), but none of torch.nn's
code runs: every method that reads torch.nn's private state is overridden here. torch.compile
refuses to trace instances of the torch.nn recurrent classes (``torch._dynamo.config.allow_rnn``);
:mod:`rnnfused._interop` lets it trace ours, which are one operator per layer.

Extras beyond torch.nn (keyword-only, off by default): ``grad_clip`` for every layer,
``cell_clip`` for LSTM, ``reset_after`` for GRU, normalized layers for every cell
(``norm="batch"`` or ``"layer"``, below), and the recurrent regularisers ``weight_drop``,
``recurrent_dropout``, ``zoneout`` and ``dropout_mode`` (:mod:`rnnfused.regularisers`); see
the class docstrings.

Lengths and resets
------------------
``forward(input, hx=None, lengths=None, resets=None)`` takes padded input (not a
PackedSequence) with, optionally:

* ``lengths``: integers ``[N]`` in 1..L, on any device (unsorted is fine). The result is
  torch.nn's on ``pack_padded_sequence(input, lengths, batch_first=..., enforce_sorted=False)``,
  padded back: outputs past a sequence's length are zero, ``h_n`` (``c_n``) is each sequence's
  state at its own last step, the reverse direction starts at each sequence's own end, and no
  gradient flows through the padding. Nothing is copied to the host: on CUDA the lengths stay
  on the GPU (bad lengths there raise through a device-side assertion), and lengths given on
  the CPU are copied to it without waiting for the GPU.
* ``resets``: bool ``[L, N]`` (``[N, L]`` with batch_first, ``[L]`` unbatched), on any device: a
  new segment starts at every step where it is True, exactly as if each segment were a
  sequence of its own (reinforcement-learning rollouts, streaming). The forward direction
  starts a segment from zero states (the first one from ``hx``, unless it resets at step 0),
  the reverse direction starts its walk through a segment from zero states at the segment's
  last step (the last segment from ``hx``); every layer of a stack resets; no gradient
  flows across a reset. ``h_n`` holds the states after the last step of each direction.
  Resets past a sequence's length are ignored.

Both are fused in the kernels: per step and row, a reset starts from zero states and a
finished row keeps its state (:func:`rnnfused.functional.step_flags`). On the CPU, lengths
without resets run as the PackedSequence they describe (the padding is skipped). Normalized
layers take lengths that way on every device (on a GPU, packing reads the lengths on the
host), and no resets yet. (They are not keyword-only: torch.onnx's TorchScript exporter
passes every defaulted parameter of ``forward`` positionally.)

Normalized layers
-----------------
``norm="batch"``: recurrent batch normalization (Cooijmans et al., "Recurrent Batch
Normalization", ICLR 2017); ``norm="layer"``: layer normalization (Ba, Kiros and Hinton 2016,
as in haste's LayerNormLSTM). The input and the hidden projection are normalized apart, then
the biases are added; an LSTM also normalizes its cell before the output tanh::

    pre = N(x_t W_ihᵀ; γ_ih) + N(h_{t-1} W_hhᵀ; γ_hh) + b_ih + b_hh
    LSTM:  c_t as usual,  h_t = o ⊙ tanh(N(c_t; γ_c, β_c))     (c_t itself is not normalized)
    GRU:   n = tanh(x_n + r ⊙ (N(h W_hhᵀ)_n + b_hn));  Cho form: N(W_hn (r ⊙ h)) normalized on its own
    N(v; γ, β) = γ (v - mean) / sqrt(var + eps) + β

Batch norm normalizes each column over the batch rows active at a time step (for packed
input, the sequences that reach that step): in training with the step's own mean and biased
variance, in eval with running statistics kept *per time step* for steps 0..``max_steps``-1
(later steps use the last ones), updated in training as ``nn.BatchNorm1d`` does with
``momentum`` (the variance unbiased). A training step with a single active row is normalized
with its running statistics and does not update them; a batch of one in training is an error,
as in ``nn.BatchNorm1d``. Statistics are indexed by time step t, also for the reverse
direction. Layer norm normalizes each row over its G gate pre-activations (the Cho GRU's
hidden side: over its r, z columns and its n columns apart) and the cell over its H units; it
has no running statistics and works for any batch.

Parameters per layer k and direction (suffix ``_l{k}`` / ``_l{k}_reverse``): ``norm_weight_ih``
and ``norm_weight_hh`` ``[G]`` (γ of the two projections), LSTM also ``norm_weight_c`` and
``norm_bias_c`` ``[H]``; batch norm buffers ``running_mean_ih``, ``running_var_ih``,
``running_mean_hh``, ``running_var_hh`` ``[max_steps, G]`` (LSTM also ``running_mean_c``,
``running_var_c`` ``[max_steps, H]``). γ starts at 0.1 for batch norm, as the paper
recommends (it keeps tanh and σ out of saturation early on), at 1 for layer norm; β at 0.
The standard weights draw the same random numbers as without norm.
"""

import contextlib
import functools
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import dispatch
from . import regularisers as _regularisers
from ._ops import LayerOptions, to_device
from .functional import (Cell, _clip_value, _needs_differentiable_equations, _norm_kind, autocast_result_dtypes,
                         check_lengths, check_resets, run_layer, step_flags)

__all__ = ["RNNBase", "RNN", "LSTM", "GRU"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_NORMS = (None, "batch", "layer")
_BATCH_NORM_GAMMA = 0.1  # Cooijmans et al.: γ = 0.1 keeps the gates out of saturation early on


def _used_on(stream, *tensors):
    """record_stream(stream) for each CUDA tensor given (None skipped)."""
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
            tensor.record_stream(stream)


class RNNBase(nn.RNNBase):
    """Stack of ``num_layers`` recurrent layers, each in one or two directions.

    Holds what torch.nn.RNNBase holds (the same attributes and parameters) and runs the
    stack layer by layer; ``dropout`` is applied to the output of every layer but the last
    in training mode, as torch.nn does. A subclass of ``torch.nn.RNNBase`` whose
    ``__init__`` is not called: torch.nn's methods that depend on its private state
    (``_flat_weights`` as a list, weak references, pickling hooks) are replaced below.
    """

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size"]

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 grad_clip=None, cell_clip=None, reset_after=True, norm=None, momentum=0.1, eps=1e-5,
                 max_steps=1000, weight_drop=0.0, recurrent_dropout=0.0, zoneout=0.0, dropout_mode="standard"):
        factory_kwargs = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # not torch.nn.RNNBase's: it would create and initialise its own weights
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.grad_clip = grad_clip
        self.cell_clip = cell_clip
        self.reset_after = reset_after
        self.norm = norm
        self.momentum = momentum
        self.eps = eps
        self.max_steps = max_steps
        # Plain attributes, as torch.nn's dropout (whole-model checkpoints load them with
        # weights_only=True); `regularisers` is their checked record.
        self.weight_drop = weight_drop
        self.recurrent_dropout = recurrent_dropout
        self.zoneout = zoneout
        self.dropout_mode = dropout_mode
        _check_config(self, dropout)

        gate_size = _GATES[mode] * hidden_size
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names = []
        self._all_weights = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
            for direction in range(num_directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes = {"weight_ih": (gate_size, layer_input_size),
                          "weight_hh": (gate_size, real_hidden_size)}
                if bias:
                    shapes["bias_ih"] = (gate_size,)
                    shapes["bias_hh"] = (gate_size,)
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                names = []
                for kind, shape in shapes.items():
                    name = f"{kind}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        # Normalized layers: after the standard weights, so that those draw torch.nn's numbers.
        self._norm_weights_names = []
        self._running_stats_names = []
        if norm is not None:
            widths = {"ih": gate_size, "hh": gate_size}  # of each normalization
            if mode == "LSTM":
                widths["c"] = hidden_size
            for index, names in enumerate(self._all_weights):
                suffix = f"_l{index // num_directions}" + ("_reverse" if index % num_directions else "")
                shapes = {f"norm_weight_{side}": width for side, width in widths.items()}
                if mode == "LSTM":
                    shapes["norm_bias_c"] = hidden_size
                norm_names = [kind + suffix for kind in shapes]
                for name, width in zip(norm_names, shapes.values()):
                    setattr(self, name, nn.Parameter(torch.empty(width, **factory_kwargs)))
                names.extend(norm_names)
                self._norm_weights_names.append(norm_names)
                running_names = []
                if norm == "batch":
                    for side, width in widths.items():
                        for stat in ("mean", "var"):
                            running_names.append(f"running_{stat}_{side}{suffix}")
                            self.register_buffer(running_names[-1], torch.empty(max_steps, width, **factory_kwargs))
                self._running_stats_names.append(running_names)
        self.reset_parameters()
        self.flatten_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every standard weight, in
        registration order (the same random draws as torch.nn); normalized layers: γ 0.1
        (batch) or 1 (layer), β 0, and the running statistics reset."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self._flat_weights:
            init.uniform_(weight, -stdv, stdv)
        for names in self._norm_weights_names:
            for name in names:
                value = 0.0 if name.startswith("norm_bias") else _BATCH_NORM_GAMMA if self.norm == "batch" else 1.0
                init.constant_(getattr(self, name), value)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Batch norm: running means 0 and variances 1 at every step, as nn.BatchNorm1d."""
        for names in self._running_stats_names:
            for name in names:
                buffer = getattr(self, name)
                if name.startswith("running_mean"):
                    init.zeros_(buffer)
                else:
                    init.ones_(buffer)

    @property
    def _flat_weights(self):
        return [getattr(self, name, None) for name in self._flat_weights_names]

    # torch.nn.RNNBase keeps ``_flat_weights`` as a list it refreshes on every assignment, copy
    # and pickling; here it is computed from the parameters, so that machinery is not needed.
    __setattr__ = nn.Module.__setattr__
    __getstate__ = nn.Module.__getstate__
    __setstate__ = nn.Module.__setstate__

    def _init_flat_weights(self) -> None:
        self.flatten_parameters()

    def _weights_have_changed(self) -> bool:
        return False

    def _update_flat_weights(self) -> None:
        pass

    def _replicate_for_data_parallel(self):
        replica = nn.Module._replicate_for_data_parallel(self)
        replica._flat_weights_names = self._flat_weights_names[:]
        return replica

    def _get_name(self):
        # repr tells ours from torch.nn's; a user's subclass keeps its own name.
        name = type(self).__name__
        return f"rnnfused.{name}" if type(self).__module__ == __name__ else name

    @property
    def all_weights(self):
        """Parameters per (layer, direction): ``[[weight_ih_l0, weight_hh_l0, ...], ...]``."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def __prepare_scriptable__(self):
        raise script_refusal(self)

    def flatten_parameters(self) -> None:
        """On CUDA, puts the standard weights into one buffer in cuDNN's layout (the parameters
        become views into it, their shapes unchanged), as torch.nn does, so that calls routed to
        cuDNN (rnnfused.dispatch) need no copy; elsewhere nothing. Called after ``.to()`` /
        ``.cuda()`` and whenever a cuDNN call finds the weights moved; our kernels read the
        parameters in place either way."""
        weights = self._flat_weights
        first = weights[0]
        if not (first.is_cuda and all(isinstance(w, torch.Tensor) and w.is_cuda and w.dtype == first.dtype
                                      and w.device == first.device for w in weights)):
            return
        if not torch.backends.cudnn.is_acceptable(first) or len({w.data_ptr() for w in weights}) != len(weights):
            return
        from torch.backends.cudnn import rnn as cudnn_rnn
        per_layer = (4 if self.bias else 2) + (1 if self.proj_size > 0 else 0)
        with torch.cuda.device_of(first), torch.no_grad():
            torch._cudnn_rnn_flatten_weight(weights, per_layer, self.input_size, cudnn_rnn.get_cudnn_mode(self.mode),
                                            self.hidden_size, self.proj_size, self.num_layers, self.batch_first,
                                            bool(self.bidirectional))
        self._cudnn_flat = tuple(w.data_ptr() for w in self._flat_weights)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.flatten_parameters()
        return result

    @property
    def regularisers(self):
        """The recurrent regularisers (:class:`rnnfused.regularisers.Regularisers`) of the
        attributes weight_drop, recurrent_dropout, zoneout and dropout_mode (absent, as in a
        module saved before they existed: off)."""
        zoneout = getattr(self, "zoneout", 0.0)
        arguments = (self.mode, getattr(self, "recurrent_dropout", 0.0),
                     tuple(zoneout) if isinstance(zoneout, list) else zoneout, getattr(self, "weight_drop", 0.0),
                     getattr(self, "dropout_mode", "standard"))
        if torch.compiler.is_compiling():
            return _regularisers.Regularisers.of(*arguments)
        return _regularisers.cached_of(*arguments)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.grad_clip is not None:
            s += f", grad_clip={self.grad_clip}"
        if self.cell_clip is not None:
            s += f", cell_clip={self.cell_clip}"
        if self.reset_after is not True:
            s += f", reset_after={self.reset_after}"
        if self.norm is not None:
            s += f", norm={self.norm!r}, eps={self.eps}"
            if self.norm == "batch":
                s += f", momentum={self.momentum}, max_steps={self.max_steps}"
        regularisers = self.regularisers
        for name, value in (("weight_drop", regularisers.weight_drop),
                            ("recurrent_dropout", regularisers.recurrent_dropout),
                            ("zoneout", regularisers.zoneout(self.mode))):
            if value:
                s += f", {name}={value}"
        if regularisers.variational_dropout:
            s += ", dropout_mode='variational'"
        return s

    # --- checks, as torch.nn ---------------------------------------------------------------

    def _expected_state_size(self, input, batch_size, width):
        mini_batch = batch_size if batch_size is not None else input.size(0 if self.batch_first else 1)
        num_directions = 2 if self.bidirectional else 1
        return (self.num_layers * num_directions, mini_batch, width)

    def _check_input(self, input, batch_sizes):
        weight_dtype = self.weight_ih_l0.dtype
        if input.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}")

    @staticmethod
    def _check_state(state, input, expected, message):
        if torch.compiler.is_compiling():
            # The batch size of packed input may be data there (an unbacked size): it can be
            # asserted at run time but not guarded on.
            torch._check(state.dim() == len(expected), lambda: "hidden state has the wrong number of dimensions")
            for actual, wanted in zip(state.shape, expected):
                torch._check(actual == wanted, lambda: "hidden state has the wrong size")
        elif state.size() != expected:
            raise RuntimeError(message.format(expected, list(state.size())))
        if state.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(f"hidden state dtype ({state.dtype}) does not match input dtype "
                               f"({input.dtype})")

    # --- the stack ------------------------------------------------------------------------

    def _cell(self):
        if self.mode == "GRU" and not self.reset_after:
            return Cell.GRU_CHO
        return getattr(Cell, self.mode)

    def _layer_options(self, reverse, side_by_side=1):
        """The options of one layer direction of this stack, as the operators take them;
        ``side_by_side``: the recurrences that run at once on the GPU, this one included."""
        return layer_options(self._cell(), self.bias, reverse, self.cell_clip, self.grad_clip, self.norm,
                             self.training, self.eps, side_by_side)

    def _step_flags(self, x, lengths, resets, is_batched):
        """The step flags of each direction ([T, B] int32) for time-major padded x [T, B, I] and
        the forward's ``lengths`` and ``resets`` (as the caller gave them), or None."""
        if lengths is None and resets is None:
            return None
        if lengths is not None and not is_batched:
            raise ValueError("lengths is for batched input (one length per sequence); unbatched input is one "
                             "whole sequence")
        steps, batch = x.size(0), x.size(1)
        if lengths is not None:
            lengths = check_lengths(lengths, steps, batch)
        if resets is not None:
            if isinstance(resets, torch.Tensor):
                if not is_batched and resets.dim() == 1:
                    resets = resets.unsqueeze(1)
                elif self.batch_first and resets.dim() == 2:
                    resets = resets.t()
            resets = check_resets(resets, steps, batch)
        # On x's device once for both directions (a CPU copy is queued, not waited for).
        lengths, resets = (None if t is None else to_device(t, x.device) for t in (lengths, resets))
        return [step_flags(steps, batch, x.device, lengths=lengths, resets=resets, reverse=direction == 1)
                for direction in range(2 if self.bidirectional else 1)]

    def _run_cudnn(self, x, batch_sizes, hx, cx):
        """The stack through torch's own RNN op (cuDNN), as torch.nn runs it: arguments and
        results as :meth:`_run_stack`'s."""
        weights = self._flat_weights
        if x.is_cuda and getattr(self, "_cudnn_flat", None) != tuple(w.data_ptr() for w in weights) and \
                not torch.cuda.is_current_stream_capturing():
            self.flatten_parameters()  # weights moved since: flatten again rather than copy every call
            weights = self._flat_weights
        args = (weights, self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        state = (hx, cx) if self.mode == "LSTM" else hx
        op = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
              "RNN_RELU": torch._VF.rnn_relu}[self.mode]
        result = op(x, state, *args, False) if batch_sizes is None else op(x, batch_sizes, state, *args)
        return result[0], result[1], (result[2] if self.mode == "LSTM" else None)

    def _autotune_candidates(self, x, batch_sizes, hx, cx, training):
        """{"ours", "cudnn"}: this call on each, forward (+ backward in training, into no .grad)."""
        def timed(run):
            def once():
                if not training:
                    with torch.no_grad():
                        run(x, batch_sizes, hx, cx)
                    return
                leaf = x.detach().requires_grad_()
                output = run(leaf, batch_sizes, hx, cx)[0]
                weights = [w for w in self._flat_weights if w.requires_grad]
                torch.autograd.grad(output.sum(), [leaf] + weights, allow_unused=True)
            return once
        return {"ours": timed(self._run_stack), "cudnn": timed(self._run_cudnn)}

    def _run(self, x, batch_sizes, batch, hx, cx, flags, batch_order=None):
        """Runs the stack (x time-major or packed) on the kernel rnnfused.dispatch chooses for
        this call: (output, h_n, c_n). ``batch_order``: a PackedSequence's unsorted_indices
        (for the record of the regularisers' masks)."""
        _check_devices(x, [hx, cx], self._flat_weights + [getattr(self, name) for names in self._norm_weights_names
                                                          + self._running_stats_names for name in names])
        weight = self.weight_ih_l0
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        autotune = None
        if x.is_cuda and dispatch.autotune_enabled() and not torch.compiler.is_compiling() \
                and not torch.cuda.is_current_stream_capturing():
            candidates = self._autotune_candidates(x, batch_sizes, hx, cx, training)
            autotune = lambda key: dispatch.autotuned(key, candidates)  # noqa: E731
        choice = dispatch.choose(self, weight, batch, training, flags, autotune)
        if choice.kernel == "cudnn":
            return self._run_cudnn(x, batch_sizes, hx, cx)
        if choice.kernel == "reference":
            dispatch.warn_reference(choice)
        return self._run_stack(x, batch_sizes, hx, cx, flags, reference=choice.kernel == "reference",
                               batch_order=batch_order)

    def _run_stack(self, x, batch_sizes, hx, cx, flags=None, reference=False, batch_order=None):
        """x: [T, B, I] time-major or [N, I] packed rows; hx [L*D, B, P]; cx [L*D, B, H] or None;
        flags: the step flags of each direction (padded input) or None; reference: run the
        reference equations; batch_order as for _run. Returns (output, h_n, c_n) with output
        in the layout of x."""
        num_directions = 2 if self.bidirectional else 1
        regularisers = self.regularisers
        call_masks = None if regularisers.is_off() else _regularisers.CallMasks([], [], batch_order)
        steps = x.size(0) if batch_sizes is None else batch_sizes.numel()
        h_n, c_n = [], []
        layer_input = x
        side = main = None
        # Only a unidirectional stack of layers can run as a pipeline (dispatch.wavefront); what
        # follows is asked only where the directions or the layers could overlap.
        pipelined = self.num_layers > 1 and not self.bidirectional
        equations = (self.bidirectional or (pipelined and dispatch.wavefront_setting() not in (0, 1))) and (
            reference or self.norm is not None or _needs_differentiable_equations([x, hx, cx, *self._flat_weights]))
        chunks = 0
        if pipelined:
            chunks = self._pipeline(self.weight_ih_l0, steps, hx.size(1), packed=batch_sizes is not None,
                                    step_flags=flags is not None, equations=equations,
                                    training=lambda: torch.is_grad_enabled() and any(
                                        t is not None and t.requires_grad for t in [x, hx, cx, *self._flat_weights])
                                    ).chunks
        if chunks:
            return self._results(x, hx, cx, *self._run_wavefront(x, hx, cx, None if flags is None else flags[0],
                                                                 chunks))
        if num_directions == 2 and dispatch.directions_side_by_side(x.device, equations):
            main = torch.cuda.current_stream(x.device)
            side = dispatch.side_streams(x.device, 1, main)[0]
        # Directions side by side share the GPU's SMs: each plans for its half where that pays.
        options = [self._layer_options(reverse=direction == 1, side_by_side=1 if side is None else 2)
                   for direction in range(num_directions)]
        for layer in range(self.num_layers):
            outputs = []
            if side is not None:
                side.wait_stream(main)  # before the forward direction is queued: the two overlap
            for direction in range(num_directions):
                index = layer * num_directions + direction
                names = self._all_weights[index]  # the standard weights in the operators' order, then norm's
                norm_weights = [getattr(self, n) for n in self._norm_weights_names[index]] if self.norm else ()
                weights = [getattr(self, n) for n in names[:len(names) - len(norm_weights)]]
                running_stats = [getattr(self, n) for n in self._running_stats_names[index]] if self.norm else ()
                beside = side is not None and direction == 1
                layer_flags = None if flags is None else flags[direction]
                try:
                    with torch.cuda.stream(side) if beside else contextlib.nullcontext():
                        masks = None
                        if call_masks is not None:
                            masks = _regularisers.draw_layer_masks(regularisers, self.training, weights[1], steps,
                                                                   hx.size(1), self.hidden_size)
                            call_masks.layers.append(masks)
                        y, h, c = run_layer(options[direction], layer_input, batch_sizes, hx[index],
                                            None if cx is None else cx[index], weights, norm_weights,
                                            running_stats, self.momentum, layer_flags, reference, masks)
                finally:
                    if beside:  # joined also on an error, which a CUDA graph capture would otherwise hide
                        main.wait_stream(side)
                if beside:
                    # The caching allocator must not hand these blocks to the other stream's
                    # allocations while this stream may still use them (autograd runs the
                    # direction's backward on the stream of its forward, too).
                    _used_on(side, layer_input, hx, cx, layer_flags, *weights)
                    _used_on(main, y, h, c, *(() if masks is None else vars(masks).values()))
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
            if layer == self.num_layers - 1:
                break
            between = None
            if self.dropout > 0 and self.training and regularisers.variational_dropout:
                between = _regularisers.draw_between_mask(self.dropout, hx.size(1), layer_input.size(-1), layer_input)
                layer_input = _regularisers.apply_between_mask(layer_input, between, batch_sizes)
            elif self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            if call_masks is not None:
                call_masks.between.append(between)
        if call_masks is not None:
            _regularisers.record(call_masks)
        return self._results(x, hx, cx, layer_input, h_n, c_n)

    def _run_wavefront(self, x, hx, cx, flags, chunks):
        """A unidirectional stack on padded x [T, B, I] as a pipeline over ``chunks`` slices of
        the steps: layer l runs slice k once layer l-1 has finished it, carrying its state from
        slice k-1. On CUDA each layer queues its slices on a stream of its own (layer 0 on the
        caller's), so layer l works on slice k beside layer l+1 on slice k-1, forward and (as
        autograd runs each backward on its forward's stream) backward; elsewhere the slices run
        in the same order one after another. ``flags``: the step flags [T, B] or None. Returns
        (output, [h_n of each layer], [c_n of each layer])."""
        steps = x.size(0)
        bounds = [(steps * k // chunks, steps * (k + 1) // chunks) for k in range(chunks)]
        streams = dispatch.pipeline_streams(x.device, self.num_layers)
        main = streams[0] if streams else None
        # As many layers as slices run at once, sharing the GPU's SMs.
        options = self._layer_options(reverse=False, side_by_side=min(self.num_layers, chunks) if streams else 1)
        layer_weights = [[getattr(self, name) for name in self._all_weights[layer]] for layer in range(self.num_layers)]
        h = list(hx.unbind(0))
        c = [None] * self.num_layers if cx is None else list(cx.unbind(0))
        outputs = []
        try:
            for stream in streams[1:] if streams else ():
                stream.wait_stream(main)
            for begin, end in bounds:
                layer_input, done = x[begin:end], None
                for layer, weights in enumerate(layer_weights):
                    stream = streams[layer] if streams else None
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        if done is not None:
                            stream.wait_event(done)
                            _used_on(stream, layer_input)
                        chunk_flags = None if flags is None else flags[begin:end]
                        layer_input, h[layer], c_out = run_layer(options, layer_input, None, h[layer], c[layer],
                                                                 weights, flags=chunk_flags)
                        c[layer] = None if cx is None else c_out
                        if stream is not None and layer + 1 < self.num_layers:
                            done = stream.record_event()
                outputs.append(layer_input)
        finally:
            for stream in streams[1:] if streams else ():
                main.wait_stream(stream)
        if streams:
            # As in _run_stack: blocks crossing streams stay reserved until both have used them.
            for stream in streams[1:]:
                _used_on(stream, hx, cx, flags, *[w for weights in layer_weights for w in weights])
            _used_on(main, *outputs, *h, *(c if cx is not None else ()))
        return torch.cat(outputs), h, c

    def _pipeline(self, weight, steps, batch, *, packed, step_flags, equations, training):
        """:func:`rnnfused.dispatch.wavefront` for a call of this stack (explain asks the same):
        ``weight`` one of its weights (device, and dtype with autocast); ``step_flags``: it has
        lengths or resets; ``equations``: it runs the reference equations or is normalized;
        ``training``: a callable, whether autograd will run a backward. The layers' description
        is made only where RNNFUSED_WAVEFRONT=auto asks for it (this runs on every call)."""
        def layer():
            width = self.proj_size if getattr(self, "proj_size", 0) > 0 else self.hidden_size
            return (self._cell(), self.hidden_size, width, batch, dispatch.effective_dtype(weight), step_flags,
                    not training())
        return dispatch.wavefront(weight.device, steps, self.num_layers, self.bidirectional, packed,
                                  equations or not self.regularisers.is_off() or (self.dropout > 0 and self.training),
                                  layer)

    def _results(self, x, hx, cx, output, h_n, c_n):
        """(output, h_n, c_n) of a stack from the last layer's output and each layer direction's
        final states; in torch.nn's result dtypes under CPU autocast."""
        h_n, c_n = _stack(h_n), (_stack(c_n) if cx is not None else None)
        kind = "RNN" if self.mode.startswith("RNN") else "LSTMP" if self.proj_size > 0 else self.mode
        dtypes = autocast_result_dtypes(kind, x, hx.dtype, None if cx is None else cx.dtype)
        if dtypes is not None:  # torch.nn's result dtypes under CPU autocast (our layers return the autocast dtype)
            output, h_n = output.to(dtypes[0]), h_n.to(dtypes[0])
            c_n = None if c_n is None else c_n.to(dtypes[1])
        return output, h_n, c_n

    def _by_packing(self, input, hx, lengths, resets):
        """Padded input with lengths (and no resets) runs as the PackedSequence it describes,
        padded back, on the CPU (the packed path skips the padding, and reading the lengths
        costs no device sync there) and for normalized layers (which take no step flags; on a
        GPU packing reads the lengths on the host). None where this does not apply: the step
        flags then hold the finished rows, without a host sync."""
        if not self._packs(input, lengths, resets):
            return None
        steps, batch = (input.size(1), input.size(0)) if self.batch_first else (input.size(0), input.size(1))
        lengths = check_lengths(lengths, steps, batch)
        packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)
        output, state = self.forward(packed, hx)
        return pad_packed_sequence(output, batch_first=self.batch_first, total_length=steps)[0], state

    def _packs(self, input, lengths, resets):
        """Whether a call with these arguments runs as a PackedSequence (_by_packing; explain
        asks the same)."""
        if (lengths is None or resets is not None or isinstance(input, PackedSequence) or input.dim() != 3
                or input.numel() == 0 or torch.compiler.is_compiling()):
            return False
        on_cpu = input.device.type == "cpu" and (not isinstance(lengths, torch.Tensor) or lengths.device.type == "cpu")
        return on_cpu or self.norm is not None

    def _forward(self, input, hx, lengths, resets):
        """Shared forward of GRU and RNN (a single hidden state); LSTM has its own."""
        by_packing = self._by_packing(input, hx, lengths, resets)
        if by_packing is not None:
            return by_packing
        name = "RNN" if self.mode.startswith("RNN") else self.mode
        num_directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = None
        batch_sizes = batch_size = None
        is_batched = True
        if packed:
            _refuse_lengths_and_resets(lengths, resets)
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch_size = _packed_batch_size(batch_sizes, sorted_indices)
            if hx is None:
                hx = input.new_zeros(self.num_layers * num_directions, batch_size, self.hidden_size)
            else:
                hx = _permute(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                tensor = " tensor" if name == "RNN" else ""
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            if hx is None:
                hx = input.new_zeros(self.num_layers * num_directions, input.size(batch_dim),
                                     self.hidden_size)
        self._check_input(input, batch_sizes)
        self._check_state(hx, input, self._expected_state_size(input, batch_size, self.hidden_size),
                          "Expected hidden size {}, got {}")

        x = input.transpose(0, 1) if (self.batch_first and not packed) else input
        flags = None if packed else self._step_flags(x, lengths, resets, is_batched)
        output, h_n, _ = self._run(x, batch_sizes, hx.size(1), hx, None, flags, unsorted_indices)
        if packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), \
                _permute(h_n, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
        return output, h_n


def _stack(states):
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


def _make_options(cell, bias, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side=1):
    return LayerOptions(cell, has_biases=bias, reverse=reverse, cell_clip=_clip_value(cell_clip, "cell_clip"),
                        grad_clip=_clip_value(grad_clip, "grad_clip"), norm=_norm_kind(norm), training=training,
                        eps=eps, side_by_side=side_by_side)


_cached_options = functools.lru_cache(maxsize=256)(_make_options)


def layer_options(cell, bias, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side=1):
    """The LayerOptions of a layer direction (or cell) with these module attributes, made once
    per combination in eager mode: a call with one step is short enough for building the
    record every time to show (python -m bench.overhead)."""
    if torch.compiler.is_compiling():
        return _make_options(cell, bias, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side)
    return _cached_options(cell, bias, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side)


def script_refusal(module):
    """The error torch.jit.script raises for our modules and cells (through
    ``__prepare_scriptable__``, before TorchScript reads the forward): what to use instead."""
    return RuntimeError(f"rnnfused.{type(module).__name__} cannot be compiled by torch.jit.script (TorchScript cannot "
                        "compile its Python forward); use torch.compile or torch.export, or torch.jit.trace")


def _check_devices(x, states, parameters):
    """torch.nn's device checks of a recurrent call (check_attributes in
    aten/src/ATen/native/RNN.cpp), with its messages: the states, then every parameter (and
    buffer) on the input's device. Without them a parameter left on the meta device (meta
    initialisation, then load_state_dict(assign=True) without its key) reached the operator."""
    device = x.device
    for kind, tensors in (("hidden", states), ("parameter", parameters)):
        for tensor in tensors:
            if tensor is not None and tensor.device != device:
                raise RuntimeError(f"Input and {kind} tensors are not at the same device, found input tensor at "
                                   f"{device} and {kind} tensor at {tensor.device}")


def _refuse_lengths_and_resets(lengths, resets):
    if lengths is not None or resets is not None:
        raise ValueError("lengths and resets are for padded input; a PackedSequence carries its own lengths "
                         "(pass the padded tensor with lengths= instead)")


def _permute(state, permutation):
    return state if permutation is None else state.index_select(1, permutation)


def _packed_batch_size(batch_sizes, sorted_indices):
    """The number of sequences of a PackedSequence. Under torch.compile the values of
    batch_sizes are data, so a shape gives the size where one is there (unsorted input)."""
    return sorted_indices.size(0) if sorted_indices is not None else int(batch_sizes[0])


def _check_config(module, dropout):
    """Constructor checks of torch.nn.RNNBase, in its order and with its messages, then ours."""
    if (not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1
            or isinstance(dropout, bool)):
        raise ValueError("dropout should be a number in range [0, 1] representing the probability "
                         "of an element being zeroed")
    if dropout > 0 and module.num_layers == 1:
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero "
                      f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                      f"num_layers={module.num_layers}", stacklevel=4)
    for name in ("bias", "batch_first"):
        value = getattr(module, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    for name in ("input_size", "hidden_size"):
        value = getattr(module, name)
        if not isinstance(value, int):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero")
    if module.num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    if module.proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if module.proj_size >= module.hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")
    if module.proj_size > 0 and module.mode != "LSTM":
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    module.regularisers  # noqa: B018 - checks the regularisers' arguments
    _clip_value(module.grad_clip, "grad_clip")
    if module.cell_clip is not None and module.mode != "LSTM":
        raise ValueError("cell_clip is only supported for LSTM")
    _clip_value(module.cell_clip, "cell_clip")
    if module.reset_after is not True and module.mode != "GRU":
        raise ValueError("reset_after is only supported for GRU")
    if not isinstance(module.reset_after, bool):
        raise TypeError(f"reset_after should be of type bool, got: {type(module.reset_after).__name__}")
    if module.norm not in _NORMS:
        raise ValueError(f"norm must be None, 'batch' or 'layer', got {module.norm!r}")
    if isinstance(module.eps, bool) or not isinstance(module.eps, numbers.Real) or not module.eps > 0:
        raise ValueError(f"eps must be a positive number, got {module.eps!r}")
    if isinstance(module.momentum, bool) or not isinstance(module.momentum, numbers.Real):
        raise TypeError(f"momentum should be a number, got: {type(module.momentum).__name__}")
    if isinstance(module.max_steps, bool) or not isinstance(module.max_steps, int) or module.max_steps <= 0:
        raise ValueError(f"max_steps must be a positive int, got {module.max_steps!r}")


class RNN(RNNBase, nn.RNN):
    r"""Multi-layer Elman RNN, drop-in for :class:`torch.nn.RNN`.

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
    grad_clip=None, weight_drop=0, recurrent_dropout=0, zoneout=0, dropout_mode="standard")``

    For each step: :math:`h_t = \tanh(x_t W_{ih}^T + b_{ih} + h_{t-1} W_{hh}^T + b_{hh})`
    (ReLU with ``nonlinearity='relu'``).

    Shapes (L sequence length, N batch, D = 2 if bidirectional else 1, H hidden_size):
        input: ``(L, H_in)`` unbatched, ``(L, N, H_in)``, ``(N, L, H_in)`` with batch_first,
            or a PackedSequence. hx: ``(D * num_layers, H)`` or ``(D * num_layers, N, H)``.
        output: ``(L, D * H)``, ``(L, N, D * H)`` or ``(N, L, D * H)`` (PackedSequence for
            packed input); h_n: ``(D * num_layers, [N,] H)``.

    grad_clip: clamp the gradient of every pre-activation to [-grad_clip, grad_clip] at each
        step of the backward pass (None: off). weight_drop, recurrent_dropout, zoneout,
        dropout_mode: the recurrent regularisers (:mod:`rnnfused.regularisers`; off by default).
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)

    def forward(self, input, hx=None, lengths=None, resets=None):
        return self._forward(input, hx, lengths, resets)


class GRU(RNNBase, nn.GRU):
    r"""Multi-layer gated recurrent unit, drop-in for :class:`torch.nn.GRU`.

    ``GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None, *, grad_clip=None, reset_after=True, weight_drop=0,
    recurrent_dropout=0, zoneout=0, dropout_mode="standard")``

    For each step (gates r, z, n in torch.nn's order)::

        r = σ(W_ir x + b_ir + W_hr h + b_hr)
        z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))         reset_after=True (torch.nn, cuDNN)
        n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)         reset_after=False (Cho et al. 2014)
        h' = (1 - z) ⊙ n + z ⊙ h

    Shapes as :class:`rnnfused.RNN`. grad_clip: clamp the gradient of every gate
    pre-activation to [-grad_clip, grad_clip] at each step of the backward pass (None: off).
    weight_drop, recurrent_dropout, zoneout, dropout_mode: the recurrent regularisers
    (:mod:`rnnfused.regularisers`; off by default).
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def forward(self, input, hx=None, lengths=None, resets=None):
        return self._forward(input, hx, lengths, resets)


class LSTM(RNNBase, nn.LSTM):
    r"""Multi-layer long short-term memory, drop-in for :class:`torch.nn.LSTM`.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None, *, grad_clip=None,
    cell_clip=None, weight_drop=0, recurrent_dropout=0, zoneout=0, dropout_mode="standard")``

    For each step (gates i, f, g, o in torch.nn's order)::

        i, f, o = σ(W_i* x + b_i* + W_h* h + b_h*),   g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        c' = f ⊙ c + i ⊙ g        (clamped to [-cell_clip, cell_clip] when cell_clip is set)
        h' = o ⊙ tanh(c')         (then h' = W_hr h' with proj_size > 0)

    Shapes (L sequence length, N batch, D = 2 if bidirectional else 1, H_out = proj_size or
    hidden_size, H_cell = hidden_size):
        input: ``(L, H_in)``, ``(L, N, H_in)``, ``(N, L, H_in)`` with batch_first, or a
            PackedSequence. (h_0, c_0): ``(D * num_layers, [N,] H_out)``,
            ``(D * num_layers, [N,] H_cell)``.
        output: ``(L, [N,] D * H_out)`` (``(N, L, D * H_out)`` with batch_first; PackedSequence
            for packed input); (h_n, c_n) shaped as (h_0, c_0).

    grad_clip: clamp the gradient of every gate pre-activation to [-grad_clip, grad_clip] at
        each step of the backward pass (None: off). weight_drop, recurrent_dropout, zoneout
        (a probability, or (p_h, p_c)), dropout_mode: the recurrent regularisers
        (:mod:`rnnfused.regularisers`; off by default).
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def forward(self, input, hx=None, lengths=None, resets=None):
        by_packing = self._by_packing(input, hx, lengths, resets)
        if by_packing is not None:
            return by_packing
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = None
        batch_sizes = batch_size = None
        is_batched = True

        def zeros(batch):
            return (input.new_zeros(self.num_layers * num_directions, batch, real_hidden_size),
                    input.new_zeros(self.num_layers * num_directions, batch, self.hidden_size))

        if packed:
            _refuse_lengths_and_resets(lengths, resets)
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch_size = _packed_batch_size(batch_sizes, sorted_indices)
            hx = zeros(batch_size) if hx is None else hx
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is None:
                hx = zeros(input.size(batch_dim))
            elif is_batched:
                if hx[0].dim() != 3 or hx[1].dim() != 3:
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            else:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError(
                        "For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        # After torch.nn's own checks, in its order: what they let through is still refused.
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"LSTM expects hx as a tuple (h_0, c_0) of tensors, got {type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        h0, c0 = _permute(hx[0], sorted_indices), _permute(hx[1], sorted_indices)
        self._check_input(input, batch_sizes)
        self._check_state(h0, input, self._expected_state_size(input, batch_size, real_hidden_size),
                          "Expected hidden[0] size {}, got {}")
        self._check_state(c0, input, self._expected_state_size(input, batch_size, self.hidden_size),
                          "Expected hidden[1] size {}, got {}")

        x = input.transpose(0, 1) if (self.batch_first and not packed) else input
        flags = None if packed else self._step_flags(x, lengths, resets, is_batched)
        output, h_n, c_n = self._run(x, batch_sizes, h0.size(1), h0, c0, flags, unsorted_indices)
        if packed:
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    (_permute(h_n, unsorted_indices), _permute(c_n, unsorted_indices)))
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)
