"""ONNX functions (onnxscript) that rnnfused.onnx's translations call; imported at export time
only (onnxscript compiles them from this module's source and resolves names in its globals)."""

from typing import TypeVar, Union

from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, script
from onnxscript import opset18 as op

# torch's exporter counts a function's outputs from its return annotation.
Float = TypeVar("Float", bound=Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE])


@script()
def rnnfused_lstm_loop(gx, h0, c0, w_hh_t, w_hr_t, low, high, reset, active) -> tuple[Float, Float, Float]:
    """The LSTM recurrence with an ONNX Loop over the steps.

    gx [T, B, 4H]: the input projection with both biases, in torch's gate order (i, f, g, o);
    h0 [B, P], c0 [B, H]; w_hh_t [P, 4H]; w_hr_t [H, P] (the identity without projection);
    low, high: the cell clip (±inf without); reset, active [T, B, 1] bool: the step flags (the
    carried state is zero at a reset; an inactive row keeps its state and outputs zeros).
    Returns y [T, B, P], h_n, c_n. The steps run in the order of gx (the caller reverses the
    time axis for a reverse direction).
    """
    steps = op.Gather(op.Shape(gx), 0)
    zero_h = op.Sub(h0, h0)
    zero_c = op.Sub(c0, c0)
    h = h0
    c = c0
    ys = op.Unsqueeze(h0, [0])  # a first row, dropped at the end: Concat needs a start of the right shape
    for t in range(steps):
        reset_t = op.Gather(reset, t, axis=0)
        active_t = op.Gather(active, t, axis=0)
        h_in = op.Where(reset_t, zero_h, h)
        c_in = op.Where(reset_t, zero_c, c)
        pre = op.Add(op.Gather(gx, t, axis=0), op.MatMul(h_in, w_hh_t))
        i, f, g, o = op.Split(pre, axis=1, num_outputs=4)
        c_new = op.Clip(op.Add(op.Mul(op.Sigmoid(f), c_in), op.Mul(op.Sigmoid(i), op.Tanh(g))), low, high)
        h_new = op.MatMul(op.Mul(op.Sigmoid(o), op.Tanh(c_new)), w_hr_t)
        h = op.Where(active_t, h_new, h_in)
        c = op.Where(active_t, c_new, c_in)
        ys = op.Concat(ys, op.Unsqueeze(op.Where(active_t, h_new, zero_h), [0]), axis=0)
    y = op.Slice(ys, [1], [9223372036854775807], [0])
    return y, h, c
