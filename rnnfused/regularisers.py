"""Recurrent regularisers of rnnfused's RNN / GRU / LSTM stacks (constructor options, all off
by default, active in training mode only, except zoneout's expectation in eval):

* ``weight_drop=p`` (DropConnect on W_hh, Merity et al. 2018, AWD-LSTM): each call multiplies
  every W_hh by one Bernoulli(1-p)/(1-p) mask, so that h_{t-1} meets ``(M ⊙ W_hh)`` at every
  step; the gradient of W_hh is masked the same way. The parameters are never replaced:
  ``state_dict``, optimisers and DDP see ordinary parameters.
* ``recurrent_dropout=p`` (variational dropout of the state, Gal & Ghahramani 2016): one
  Bernoulli(1-p)/(1-p) mask m [B, H_out] per call, layer and direction, the same at every
  step, on h_{t-1} where it enters the recurrent product: ``W_hh (m ⊙ h_{t-1})`` (the GRU's
  ``z ⊙ h_{t-1}`` carry keeps the unmasked state).
* ``zoneout=p`` or, for LSTM, ``(p_h, p_c)`` (Krueger et al. 2017): at every step each unit
  of each row keeps its previous value with probability p, ``h_t = k ⊙ h_{t-1} + (1 - k) ⊙
  h̃_t`` with k ~ Bernoulli(p) (c_t alike with p_c); in eval k = p, the expectation.
* ``dropout_mode="variational"``: the between-layer ``dropout`` draws one mask per sequence
  for all steps (locked dropout) instead of torch.nn's new mask at every step.

Masks come from torch's generator of the input's device (reproducible under
``torch.manual_seed``). On a GPU zoneout's masks in training are not stored: the generator
gives a seed, and the kernels draw each element from a counter-based generator (Philox4x32-10,
as torch's CUDA dropout; csrc/philox.h), forward and backward alike, so that a layer keeps 16
bytes instead of T·B·H values per mask (:func:`kernels_draw`). :func:`drawn_keep` computes the
same weights with tensor operations. :func:`captured_masks` records the masks of every call made inside it;
:func:`rnnfused.reference.forward` takes such a record and computes the same call with the loop
over time.

Which kernels run them: weight drop and variational between-layer dropout act outside the
recurrence, on the fused kernels. Recurrent dropout and zoneout act inside every step: the
stepwise kernels take their masks (csrc/steps.h; the persistent kernels do not, so such a layer
runs stepwise). Zoneout in a normalized layer runs the reference equations, and so do both
under torch.export and torch.jit.trace, whose graphs hold the equations.
"""

import contextlib
import dataclasses
import functools
import math
import numbers

import torch

from ._ops import to_device

DROPOUT_MODES = ("standard", "variational")


def _probability(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Regularisers:
    """The regularisers of a stack (see the module docstring); 0 is off."""

    recurrent_dropout: float = 0.0
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0
    weight_drop: float = 0.0
    variational_dropout: bool = False

    @classmethod
    def of(cls, mode, recurrent_dropout=0.0, zoneout=0.0, weight_drop=0.0, dropout_mode="standard"):
        """The record of the constructor arguments of a ``mode`` ("LSTM", "GRU", "RNN_TANH",
        "RNN_RELU") stack, checked."""
        if dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be 'standard' or 'variational', got {dropout_mode!r}")
        if isinstance(zoneout, (tuple, list)):
            if mode != "LSTM" or len(zoneout) != 2:
                raise ValueError("zoneout takes a pair (p_h, p_c) only for LSTM; give one probability otherwise")
            zoneout_h, zoneout_c = (_probability(p, "zoneout") for p in zoneout)
        else:
            zoneout_h = _probability(zoneout, "zoneout")
            zoneout_c = zoneout_h if mode == "LSTM" else 0.0
        return cls(_probability(recurrent_dropout, "recurrent_dropout"), zoneout_h, zoneout_c,
                   _probability(weight_drop, "weight_drop"), dropout_mode == "variational")

    def zoneout(self, mode):
        """The constructor's form: one probability, or (p_h, p_c) for an LSTM whose differ."""
        return (self.zoneout_h, self.zoneout_c) if mode == "LSTM" and self.zoneout_h != self.zoneout_c \
            else self.zoneout_h

    def active(self, training, dropout):
        """In words, what acts on a call in this mode (``dropout``: the stack's between-layer
        dropout): for explain and for the dispatch (cuDNN computes none of it)."""
        words = []
        if training and self.weight_drop:
            words.append(f"weight_drop={self.weight_drop}")
        if training and self.recurrent_dropout:
            words.append(f"recurrent_dropout={self.recurrent_dropout}")
        if self.zoneout_h or self.zoneout_c:
            words.append(f"zoneout=({self.zoneout_h}, {self.zoneout_c})")
        if training and dropout and self.variational_dropout:
            words.append("dropout_mode='variational'")
        return words

    def is_off(self):
        """Whether no regulariser is set. Field by field rather than ``== Regularisers()``:
        under torch.compile(dynamic=True) the probabilities may be symbolic floats, which a
        dataclass's tuple equality cannot take."""
        return not (self.recurrent_dropout or self.zoneout_h or self.zoneout_c or self.weight_drop
                    or self.variational_dropout)

    def inside_steps(self, training):
        """Whether a call in this mode has masks inside the recurrence (recurrent dropout, zoneout)."""
        return bool((training and self.recurrent_dropout) or self.zoneout_h or self.zoneout_c)


# Made once per combination: a module builds its record at every call (bench.overhead).
cached_of = functools.lru_cache(maxsize=256)(Regularisers.of)


@dataclasses.dataclass
class Masks:
    """The masks of one layer direction in one call, in the layer's layout (padded [T, B], or
    for packed input the padded form of the packed rows, sorted order); None where off.

    weight [G, H_out]: multiplies W_hh. hidden [B, H_out]: multiplies h_{t-1} where it enters
    the recurrent product. keep_h [T, B, H_out] and keep_c [T, B, H] (LSTM): zoneout's k, 0/1
    in training, or a number (p, the expectation) in eval; in training also int64 [2] (seed,
    threshold), the form the kernels draw from (:func:`keep_weights` gives the 0/1 tensor)."""

    weight: torch.Tensor = None
    hidden: torch.Tensor = None
    keep_h: object = None
    keep_c: object = None

    @property
    def inside_steps(self):
        return self.hidden is not None or self.keep_h is not None or self.keep_c is not None


@dataclasses.dataclass
class CallMasks:
    """Every mask of one call of a stack: ``layers[layer * D + direction]`` and ``between[l]``,
    the between-layer dropout mask after layer l ([B, features], variational mode; None in
    standard mode, whose masks torch.nn's dropout draws). Their batch rows are in the layer's
    order: ``batch_order`` (a PackedSequence's unsorted_indices, also for padded input with
    lengths run as one) takes them to the caller's; None: the same."""

    layers: list
    between: list
    batch_order: torch.Tensor = None


def _bernoulli(p, shape, like):
    """0/1 with P(1) = p in the dtype of ``like``, from its device's generator (uniform draws
    compared: on the CPU half the time of bernoulli_)."""
    return (torch.rand(shape, device=like.device) < p).to(like.dtype)


def _dropout_mask(p, shape, like):
    if p == 1:  # dropout drops everything
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return _bernoulli(1 - p, shape, like).div_(1 - p)


def kernels_draw(device):
    """Whether the kernels draw zoneout's training masks on ``device`` (saved as seeds): on a
    GPU, where that saves T·B·H values per mask and the draws' arithmetic hides behind the
    passes' memory traffic; not on the CPU, where reading stored masks costs less
    (``python -m bench.regularisers``, 2-layer LSTM T64 B32 H256: zoneout 1.12x the plain call
    with stored masks, 1.26x drawn)."""
    return device.type != "cpu"


def _keep(p, shape, like, training):
    if not p:
        return None
    if not training:
        return p
    if not kernels_draw(like.device):
        return _bernoulli(p, shape, like)
    draw = torch.randint(0, 2**62, (2,), device=like.device)
    draw[1:].fill_(round(p * 2**32))
    return draw


_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_WORD = 0xFFFFFFFF


def _mulhilo(a, multiplier):
    """(high, low) 32-bit words of ``a * multiplier`` for int64 tensors of 32-bit words, in
    16-bit halves of the multiplier so that no product leaves int64."""
    low_half = a * (multiplier & 0xFFFF)
    high_half = a * (multiplier >> 16)
    low = low_half + ((high_half & 0xFFFF) << 16)
    return (high_half >> 16) + (low >> 32), low & _WORD


def philox_bits(seed, index):
    """csrc/philox.h's ``bits(seed, index)``, Philox4x32-10's first word of counter (index, 0,
    0) under key seed, for an int64 tensor of indices (seed: a non-negative int64 tensor, 0-d)."""
    c0, c1 = index & _WORD, (index >> 32) & _WORD
    c2 = c3 = torch.zeros_like(index)
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _PHILOX_WEYL[0]) & _WORD, (k1 + _PHILOX_WEYL[1]) & _WORD
        high0, low0 = _mulhilo(c0, _PHILOX_MULTIPLIERS[0])
        high1, low1 = _mulhilo(c2, _PHILOX_MULTIPLIERS[1])
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return c0


def drawn_keep(draw, shape, dtype):
    """The 0/1 zoneout weights [T, B, width] the kernels draw from ``draw`` = int64 [2] (seed,
    threshold): element n (row-major) is 1 where its Philox bits are below the threshold."""
    index = torch.arange(math.prod(shape), device=draw.device)
    return (philox_bits(draw[0], index) < draw[1]).to(dtype).reshape(shape)


def keep_weights(keep, shape, dtype):
    """A Masks' keep_h or keep_c as the reference uses it: a tensor [T, B, width] or a number
    (a drawn int64 [2] becomes its 0/1 tensor of ``shape``)."""
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.int64 and keep.shape == (2,):
        return drawn_keep(keep, shape, dtype)
    return keep


def draw_layer_masks(regularisers, training, w_hh, steps, batch, hidden):
    """The masks of one layer direction for a call: ``w_hh`` [G, H_out] gives the dtype and
    device; steps and batch are those of the padded layout."""
    width = w_hh.size(1)
    masks = Masks()
    if training and regularisers.weight_drop:
        masks.weight = _dropout_mask(regularisers.weight_drop, w_hh.shape, w_hh)
    if training and regularisers.recurrent_dropout:
        masks.hidden = _dropout_mask(regularisers.recurrent_dropout, (batch, width), w_hh)
    masks.keep_h = _keep(regularisers.zoneout_h, (steps, batch, width), w_hh, training)
    masks.keep_c = _keep(regularisers.zoneout_c, (steps, batch, hidden), w_hh, training)
    return masks


def draw_between_mask(p, batch, features, like):
    """Variational between-layer dropout: one mask per sequence, [B, features]."""
    return _dropout_mask(p, (batch, features), like)


def apply_between_mask(layer_output, mask, batch_sizes):
    """``layer_output`` (padded [T, B, F] or packed rows [N, F] with ``batch_sizes``) times the
    mask of its sequences."""
    if batch_sizes is None:
        return layer_output * mask
    # Step t's rows are its sequences 0 .. batch_sizes[t] - 1, in the packed order.
    index = torch.arange(int(batch_sizes[0])).expand(batch_sizes.numel(), -1)
    rows = index[index < batch_sizes.unsqueeze(1)]
    return layer_output * mask.index_select(0, to_device(rows, mask.device))


_CAPTURES = []


@contextlib.contextmanager
def captured_masks():
    """Records the :class:`CallMasks` of every stack call made in the block, in call order::

        with rnnfused.regularisers.captured_masks() as calls:
            y, _ = lstm(x)
        y_ref, _ = rnnfused.reference.forward(lstm, x, masks=calls[0])
    """
    calls = []
    _CAPTURES.append(calls)
    try:
        yield calls
    finally:
        _CAPTURES.remove(calls)


def record(call_masks):
    for calls in _CAPTURES:
        calls.append(call_masks)
