"""The implementations a benchmark compares, all with the weights of one torch.nn module.

Each `make_*(base, cell, config, device, dtype)` returns a `Runner`: `runner(x, mode)` runs
mode "fwd" under no_grad, or "fwdbwd": forward and `output.backward(ones_like(output))`
(the cuDNN baselines' definition), and returns the output (the data of a packed output);
`runner.weight_grads()` gives the weight gradients of the last backward under torch.nn's
parameter names, for the correctness check. `unavailable(...)` says why an implementation
cannot run a case, or None. A new implementation is one more `make_*` in IMPLEMENTATIONS
(and, if it cannot run everywhere, a reason in `unavailable`).
"""

import contextlib
import copy
import os

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnfused

TORCH_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN, "RNN_RELU": nn.RNN}
OURS_CLASSES = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN": rnnfused.RNN, "RNN_RELU": rnnfused.RNN}
TORCH_CELLS = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN": nn.RNNCell, "RNN_RELU": nn.RNNCell}
OURS_CELLS = {"LSTM": rnnfused.LSTMCell, "GRU": rnnfused.GRUCell, "RNN": rnnfused.RNNCell,
              "RNN_RELU": rnnfused.RNNCell}


def module_kwargs(cell, config):
    kwargs = {} if config.cell_loop else dict(num_layers=config.layers, bidirectional=config.bidirectional)
    if cell == "RNN_RELU":
        kwargs["nonlinearity"] = "relu"
    return kwargs


def base_module(cell, config, seed=0):
    """The torch.nn module (fp32, CPU) whose weights every implementation uses: the layer,
    or for a cell loop the cell."""
    torch.manual_seed(seed)
    classes = TORCH_CELLS if config.cell_loop else TORCH_CLASSES
    return classes[cell](config.I, config.H, **module_kwargs(cell, config))


def _cell_loop(step):
    """forward(x [T, B, I]) -> h of every step [T, B, H] for step(x_t, state) -> state."""
    def forward(x):
        state, outputs = None, []
        for x_t in x:
            state = step(x_t, state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outputs)
    return forward


class Runner:
    """What the harness checks and times: `runner(x, mode)` around `forward(x)` -> output
    (tensor or PackedSequence), run inside `context()`. `weight_grads()` returns
    {torch.nn parameter name: gradient} of the module's parameters, or, for an
    implementation whose weights are laid out differently, what `grads()` returns (its own
    weight tensors are then `leaves`, whose gradients `zero_grad()` clears)."""

    def __init__(self, forward, module=None, context=contextlib.nullcontext, grads=None, leaves=()):
        self.forward, self.module, self.context, self.grads, self.leaves = forward, module, context, grads, leaves

    def __call__(self, x, mode):
        with self.context():
            if mode == "fwd":
                with torch.no_grad():
                    output = self.forward(x)
            else:
                output = self.forward(x)
            data = output.data if isinstance(output, PackedSequence) else output
            if mode != "fwd":
                data.backward(torch.ones_like(data))
        return data.detach()

    def zero_grad(self):
        if self.module is not None:
            self.module.zero_grad(set_to_none=True)
        for leaf in self.leaves:
            leaf.grad = None

    def weight_grads(self):
        if self.grads is not None:
            return self.grads()
        return {name: p.grad for name, p in self.module.named_parameters()}


def _forward(module, config):
    return _cell_loop(module) if config.cell_loop else (lambda x: module(x)[0])


@contextlib.contextmanager
def kernel_setting(value, **more):
    """RNNFUSED_KERNEL (and the RNNFUSED_<NAME> of ``more``) for the calls inside (read at
    every call)."""
    values = {"RNNFUSED_KERNEL": value, **{f"RNNFUSED_{name.upper()}": v for name, v in more.items()}}
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _ours(cell, config, base, device, dtype):
    classes = OURS_CELLS if config.cell_loop else OURS_CLASSES
    module = classes[cell](config.I, config.H, **module_kwargs(cell, config))
    module.load_state_dict(base.state_dict())
    return module.to(device=device, dtype=dtype)


def make_rnnfused(base, cell, config, device, dtype):
    """rnnfused as a user gets it (RNNFUSED_KERNEL=auto picks the kernel)."""
    module = _ours(cell, config, base, device, dtype)
    return Runner(_forward(module, config), module, lambda: kernel_setting("auto"))


def make_rnnfused_ours(base, cell, config, device, dtype):
    """rnnfused on our own kernels only (RNNFUSED_KERNEL=ours: never cuDNN; the persistent
    kernel where it plans, verified or not), so that their ratio to cuDNN stays visible
    behind the dispatch."""
    module = _ours(cell, config, base, device, dtype)
    return Runner(_forward(module, config), module, lambda: kernel_setting("ours"))


def make_rnnfused_persistent(base, cell, config, device, dtype):
    """rnnfused with the persistent kernel forced (RNNFUSED_KERNEL=persistent)."""
    module = _ours(cell, config, base, device, dtype)
    return Runner(_forward(module, config), module, lambda: kernel_setting("persistent"))


def make_rnnfused_stepwise(base, cell, config, device, dtype):
    """rnnfused with the stepwise kernels forced (RNNFUSED_KERNEL=stepwise): stage 1."""
    module = _ours(cell, config, base, device, dtype)
    return Runner(_forward(module, config), module, lambda: kernel_setting("stepwise"))


def make_rnnfused_one_stream(base, cell, config, device, dtype):
    """rnnfused on our own kernels with a bidirectional layer's directions one after the other
    on one CUDA stream, each planned for the whole device (RNNFUSED_CONCURRENT_DIRECTIONS=0):
    beside rnnfused_ours, what running them side by side, each on its share of the SMs where
    the planner finds that pays, gains."""
    module = _ours(cell, config, base, device, dtype)
    return Runner(_forward(module, config), module, lambda: kernel_setting("ours", concurrent_directions="0"))


def make_rnnfused_wavefront(base, cell, config, device, dtype):
    """rnnfused on our own kernels with a deep stack's layers pipelined over the slices of the
    steps the planner's cost model finds cheapest, a CUDA stream per layer, or layer after layer
    where no pipeline pays by it (RNNFUSED_WAVEFRONT=auto; rnnfused.explain says which): beside
    rnnfused_ours, what the pipeline gains and whether the model chooses well."""
    module = _ours(cell, config, base, device, dtype)
    return Runner(_forward(module, config), module, lambda: kernel_setting("ours", wavefront="auto"))


_SETTINGS = {"rnnfused": "auto", "rnnfused_ours": "ours", "rnnfused_one_stream": "ours",
             "rnnfused_wavefront": "ours", "rnnfused_persistent": "persistent", "rnnfused_stepwise": "stepwise"}


def kernel_of(name, cell, config, device, dtype):
    """The kernel rnnfused's implementation `name` runs for this case (rnnfused.explain)."""
    setting = _SETTINGS.get(name)
    if setting is None:
        return None
    module = _ours(cell, config, base_module(cell, config), device, dtype)
    probe = torch.empty(config.T, config.B, config.I, device=device, dtype=dtype)
    with kernel_setting(setting):
        try:
            kernels = {choice.kernel for choice in rnnfused.explain(module, probe)}
        except RuntimeError as error:
            return f"none: {str(error).splitlines()[0]}"
    return "/".join(sorted(kernels))


def make_torch(base, cell, config, device, dtype):
    """torch.nn as it runs by default: cuDNN on a GPU, oneDNN / native on a CPU (for a cell
    loop: torch's fused cell functions)."""
    module = copy.deepcopy(base).to(device=device, dtype=dtype)
    return Runner(_forward(module, config), module)


def make_torch_native(base, cell, config, device, dtype):
    """torch.nn on the GPU with cuDNN disabled: torch's own fused-cell CUDA path."""
    module = copy.deepcopy(base).to(device=device, dtype=dtype)
    return Runner(lambda x: module(x)[0], module, lambda: torch.backends.cudnn.flags(enabled=False))


def make_reference(base, cell, config, device, dtype):
    module = copy.deepcopy(base).to(device=device, dtype=dtype)
    if not config.cell_loop:
        return Runner(lambda x: rnnfused.reference.forward(module, x)[0], module)
    mode = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN_TANH", "RNN_RELU": "RNN_RELU"}[cell]
    weights = {"w_ih": module.weight_ih, "w_hh": module.weight_hh, "b_ih": module.bias_ih, "b_hh": module.bias_hh,
               "w_hr": None}

    def step(x_t, state):
        if state is None:
            zeros = x_t.new_zeros(x_t.size(0), config.H)
            state = (zeros, zeros) if mode == "LSTM" else zeros
        h, c = state if mode == "LSTM" else (state, None)
        h, c = rnnfused.reference.cell_step(mode, x_t, h, c, weights)
        return (h, c) if mode == "LSTM" else h
    return Runner(_cell_loop(step), module)


def make_flashrnn(base, cell, config, device, dtype):
    """FlashRNN's fused CUDA LSTM with the same weights: one head of size H, gates i, f, z, o
    (torch.nn's i, f, g, o), R[g] = W_hh[g]ᵀ so that the recurrent term is h R[g]. The
    input projection x W_ihᵀ + b is part of the timed work, as for every implementation."""
    from flashrnn import flashrnn

    H = config.H
    params = {k: v.detach().to(device=device, dtype=dtype) for k, v in base.named_parameters()}
    w_ih = params["weight_ih_l0"].requires_grad_()
    bias = (params["bias_ih_l0"] + params["bias_hh_l0"]).requires_grad_()
    R = params["weight_hh_l0"].view(4, H, H).transpose(1, 2).reshape(4, 1, H, H).contiguous().requires_grad_()
    zero_b = torch.zeros(4, 1, H, device=device, dtype=dtype)
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]

    def forward(x):  # x [T, B, I] -> h of every step [T, B, H]
        wx = (x.transpose(0, 1) @ w_ih.t() + bias).view(x.shape[1], x.shape[0], 4, 1, H)
        states, _ = flashrnn(wx, R, zero_b, function="lstm", backend="cuda_fused", dtype=name)
        return states[0, :, :, 0].transpose(0, 1)

    def grads():
        """FlashRNN's gradients under torch.nn's names: the fused bias's gradient is that of
        both biases; R's is W_hh's transposed back."""
        if w_ih.grad is None:
            return {name: None for name in params}
        d_hh = R.grad.reshape(4, H, H).transpose(1, 2).reshape(4 * H, H)
        return {"weight_ih_l0": w_ih.grad, "weight_hh_l0": d_hh, "bias_ih_l0": bias.grad, "bias_hh_l0": bias.grad}

    return Runner(forward, grads=grads, leaves=(w_ih, bias, R))


IMPLEMENTATIONS = {
    "rnnfused": make_rnnfused,
    "rnnfused_ours": make_rnnfused_ours,
    "rnnfused_persistent": make_rnnfused_persistent,
    "rnnfused_stepwise": make_rnnfused_stepwise,
    "rnnfused_one_stream": make_rnnfused_one_stream,
    "rnnfused_wavefront": make_rnnfused_wavefront,
    "torch": make_torch,
    "torch_native": make_torch_native,
    "reference": make_reference,
    "flashrnn": make_flashrnn,
}


def unavailable(name, cell, config, device, dtype):
    """None when `name` can run this case, else the reason it is skipped."""
    if name.startswith("rnnfused") and device not in rnnfused.backends():
        return f"this build has no {device} kernels"
    if name == "rnnfused_persistent":
        kernel = kernel_of(name, cell, config, device, dtype)
        if kernel != "persistent":
            return f"no persistent plan ({kernel})"
    if name == "rnnfused_one_stream" and (device != "cuda" or not config.bidirectional):
        return "only a bidirectional layer on a GPU runs two streams"
    if name == "rnnfused_wavefront" and (device != "cuda" or config.layers < 2 or config.bidirectional
                                         or config.packed or config.cell_loop):
        return "the layer pipeline is for a padded unidirectional stack on a GPU"
    if name == "torch_native" and device != "cuda":
        return "cuDNN on/off only matters on a GPU"
    if name == "torch_native" and config.cell_loop:
        return "torch.nn's cells do not use cuDNN"
    if name == "flashrnn":
        if device != "cuda":
            return "FlashRNN is CUDA only"
        if cell != "LSTM" or config.layers != 1 or config.bidirectional or config.packed or config.cell_loop:
            return "mapped for single-layer unidirectional padded LSTM only"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return "FlashRNN has no kernels for this dtype"
        try:
            import flashrnn  # noqa: F401
        except Exception as error:  # noqa: BLE001 - any import failure means it cannot run
            return f"not importable ({type(error).__name__}); pip install flashrnn"
    return None
