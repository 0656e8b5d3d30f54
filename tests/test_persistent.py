"""Stage 2, the persistent recurrence: the planner over every benchmark configuration, the
CTA program run through its host simulation (RNNFUSED_KERNEL=simulate: the kernel's own
tiling, shared-memory layout, padding, masking and phase order, CTAs in shuffled order)
against the reference, kernel selection and rnnfused.explain; on a GPU, the kernel itself."""

import contextlib
import copy
import itertools
import os
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused import _C, _ops
from rnnfused._ops import Cell
from bench import configs
from conftest import flatten, max_error, tf32_switch

H100 = dict(sm_count=132, smem_per_block=227 * 1024, compute_capability=90, cooperative_launch=True, max_cluster=16)
A100 = dict(sm_count=108, smem_per_block=163 * 1024, compute_capability=80, cooperative_launch=True, max_cluster=0)
ELEMENT = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


@contextlib.contextmanager
def environment(**values):
    """Sets environment variables (None: unset) for the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _plan(cell, H, B, dtype, tf32=True, limits=H100, P=None, host_simulation=False, spread=False, hold=True,
          side_by_side=1, inference=False):
    return _C.plan(int(cell), H, H if P is None else P, B, dtype, tf32, limits["sm_count"], limits["smem_per_block"],
                   limits["compute_capability"], limits["cooperative_launch"], host_simulation, spread,
                   limits["max_cluster"], hold, side_by_side, inference)


def _held_by_busiest_warp(M, N, K, split, mma_k):
    """Enumerated here, independently of plan.h: the MMAs of the jobs of each of the 8 warps
    (job j by warp j % 8: output tile j % tiles over K part j // tiles), the most any warp
    has, or 0 where K's parts are unequal or a warp would hold more than 16 fragments."""
    steps, tiles = K // 16, (M // 16) * (N // 16)
    parts = [(p + 1) * steps // split - p * steps // split for p in range(split)]
    if len(set(parts)) > 1:
        return 0
    per_warp = [0] * 8
    for job in range(tiles * split):
        per_warp[job % 8] += parts[job // tiles] * 16 // mma_k
    return max(per_warp) if max(per_warp) <= 16 else 0


def _check_held(plan, cell, dtype):
    """W in registers where every product of a pass is the whole W tile (not GRU_CHO's; a
    backward that takes all gates' dG at once) and each warp holds at most 16 fragments."""
    mma_k = 8 if dtype == torch.float32 else 16
    forward = backward = 0
    if cell != Cell.GRU_CHO:
        forward = _held_by_busiest_warp(plan["gate_rows"], plan["rows_pad"], plan["k_fwd"], plan["split_fwd"], mma_k)
        if plan["chunk_gates"] * plan["k_block"] == plan["k_bwd"]:
            backward = _held_by_busiest_warp(plan["unit_rows"], plan["rows_pad"], plan["k_bwd"], plan["split_bwd"],
                                             mma_k)
    assert (plan["held_fwd"], plan["held_bwd"]) == (forward, backward), plan
    assert ("W in registers" in plan["reason"]) == (forward + backward > 0), plan["reason"]


def _check_tiling(plan, H, B, dtype, limits):
    """Every (unit, row) belongs to exactly one CTA; the layout fits and is aligned."""
    assert plan["unit_tiles"] * plan["units"] >= H > (plan["unit_tiles"] - 1) * plan["units"]
    assert plan["row_tiles"] * plan["rows"] >= B > (plan["row_tiles"] - 1) * plan["rows"]
    assert plan["ctas"] == plan["unit_tiles"] * plan["row_tiles"] <= limits["sm_count"]
    for key in ("rows_pad", "gate_rows", "k_fwd", "unit_rows", "k_block", "k_bwd"):
        assert plan[key] % 16 == 0, key
    elem = ELEMENT[dtype]
    for key in ("ld_w_fwd", "ld_w_bwd"):
        assert plan[key] * elem % 16 == 0 and plan[key] >= plan["k_" + key[-3:]]
    assert plan["ld_dg"] * elem % 16 == 0 and plan["ld_dg"] >= plan["chunk_gates"] * plan["k_block"]
    assert plan["ld_acc_fwd"] % 4 == 0 and plan["ld_acc_bwd"] % 4 == 0
    signals = ("signals",) if plan["cluster"] else ()
    regions = {"fwd": ("weights", "operand", "acc", "partials", "state", "inputs", "bias") + signals,
               "bwd": ("weights", "operand", "acc", "partials", "state", "state2")
               + (("inputs", "narrow") if plan["prefetch_bwd"] else ()) + signals}
    for direction, names in regions.items():
        layout = plan[direction]
        assert layout["bytes"] <= limits["smem_per_block"]
        offsets = [layout[k] for k in names]
        assert offsets == sorted(offsets) and all(o % 128 == 0 for o in offsets)
    if plan["cluster"]:
        # One cluster per batch tile, all dG gates at once, two operand tiles each way.
        assert plan["cluster"] == plan["unit_tiles"] and 1 < plan["cluster"] <= limits["max_cluster"]
        assert plan["row_tiles"] <= limits["sm_count"] // 16 * (16 // plan["cluster"])  # all resident at once
        assert plan["chunk_gates"] * plan["k_block"] == plan["k_bwd"]
        assert plan["fwd"]["acc"] - plan["fwd"]["operand"] >= 2 * plan["rows_pad"] * plan["ld_w_fwd"] * elem
        assert plan["bwd"]["acc"] - plan["bwd"]["operand"] >= 2 * plan["rows_pad"] * plan["ld_dg"] * elem
        # Every push is made of whole 4-byte words; the two mbarriers come last.
        assert plan["units"] * elem % 4 == 0
        assert all(plan[d]["bytes"] >= plan[d]["signals"] + 16 > 16 for d in ("fwd", "bwd"))


BENCH_CONFIGS = configs.BASELINES + configs.CPU_DEFAULTS + configs.CELL_LOOPS + configs.CPU_CELL_LOOPS + [
    c for kind in ("batch", "hidden", "seq") for c in configs.sweep(kind, "cuda")]


@pytest.mark.parametrize("config", BENCH_CONFIGS, ids=lambda c: f"{c.name}-{c.describe().replace(' ', '')}")
@pytest.mark.parametrize("limits", [H100, A100], ids=["H100", "A100"])
def test_every_bench_config_gets_a_valid_plan_or_a_stated_reason(config, limits):
    for cell, dtype, tf32 in itertools.product(Cell, (torch.float16, torch.bfloat16, torch.float32), (True, False)):
        plan = _plan(cell, config.H, config.B, dtype, tf32, limits)
        if plan["persistent"]:
            _check_tiling(plan, config.H, config.B, dtype, limits)
            _check_held(plan, cell, dtype)
            assert plan["reason"].startswith("persistent: ")
        else:
            assert plan["reason"].startswith("stepwise: ") and len(plan["reason"]) > 12


def test_planner_decisions():
    fastrnns = _plan(Cell.LSTM, 512, 64, torch.float16)
    assert fastrnns["persistent"] and fastrnns["chunk_gates"] == 4
    tf32 = _plan(Cell.LSTM, 512, 64, torch.float32)  # its dG tile of all four gates would not fit
    assert tf32["persistent"] and tf32["chunk_gates"] < 4
    latency = _plan(Cell.GRU, 256, 1, torch.bfloat16)
    assert latency["persistent"] and latency["rows"] == 1 and latency["row_tiles"] == 1
    assert "fit" in _plan(Cell.LSTM, 1024, 256, torch.float32)["reason"]  # "big" is stage 1's
    assert "float64" in _plan(Cell.LSTM, 64, 8, torch.float64)["reason"]
    assert "TF32 off" in _plan(Cell.LSTM, 64, 8, torch.float32, tf32=False)["reason"]
    assert "projection" in _plan(Cell.LSTM, 64, 8, torch.float16, P=32)["reason"]
    assert "8.0" in _plan(Cell.LSTM, 64, 8, torch.float16, limits=dict(H100, compute_capability=75))["reason"]
    # Without cooperative launch (MPS, MIG) only plans without a grid barrier run: one CTA per
    # batch tile, or clusters.
    no_cooperative = dict(H100, cooperative_launch=False)
    assert "cooperative launch, which the grid barrier needs where W_hh (2048 KB) does not fit one CTA or one " \
           "cluster" in _plan(Cell.LSTM, 512, 8, torch.float16, limits=no_cooperative)["reason"]
    without = _plan(Cell.GRU, 64, 8, torch.float16, limits=no_cooperative)
    assert without["persistent"] and without["cluster"] == without["unit_tiles"] > 1
    one_cta = _plan(Cell.GRU, 64, 8, torch.float16, limits=dict(no_cooperative, max_cluster=0))
    assert one_cta["persistent"] and one_cta["unit_tiles"] == 1
    assert not _plan(Cell.GRU, 64, 8, torch.float16, limits=no_cooperative, spread=True)["persistent"]
    # The host simulation plans every dtype.
    assert _plan(Cell.LSTM, 64, 8, torch.float64, host_simulation=True)["persistent"]


def test_recurrences_side_by_side_plan_for_their_share_of_the_sms_where_it_pays():
    """A recurrence that runs beside others (a bidirectional layer's directions on two CUDA
    streams, the layers of a pipeline) keeps a plan that already fits its share of the SMs; else
    it takes the plan for its share, so that the launches run at once, where the cost model
    estimates its step below what running them one after another costs; else the plan for all
    the SMs."""
    def same_tiling(a, b):
        return {k: v for k, v in a.items() if k not in ("reason", "candidates")} == \
            {k: v for k, v in b.items() if k not in ("reason", "candidates")}

    # fastrnns LSTM fp16: 128 CTAs alone; beside the other direction, the plan for 66 SMs, whose
    # step costs more than the whole device's but less than two of them.
    whole = _plan(Cell.LSTM, 512, 64, torch.float16)
    shared = _plan(Cell.LSTM, 512, 64, torch.float16, side_by_side=2)
    assert whole["ctas"] > 66 >= shared["ctas"]
    assert _step_ns(whole) < _step_ns(shared) < 2 * _step_ns(whole)
    half_device = _plan(Cell.LSTM, 512, 64, torch.float16, limits=dict(H100, sm_count=66))
    assert same_tiling(shared, half_device)
    assert shared["reason"] == half_device["reason"] + "; planned for 66 of the 132 SMs (2 recurrences side by side)"
    # A plan that fits its share already (small: 16 CTAs) stays as it is, word for word.
    assert _plan(Cell.LSTM, 128, 16, torch.float16, side_by_side=2) == _plan(Cell.LSTM, 128, 16, torch.float16)
    # Four at once (a pipeline of four layers): nothing fits 33 SMs in fp32 at H512.
    assert not _plan(Cell.LSTM, 512, 64, torch.float32, limits=dict(H100, sm_count=33))["persistent"]
    crowded = _plan(Cell.LSTM, 512, 64, torch.float32, side_by_side=4)
    assert same_tiling(crowded, _plan(Cell.LSTM, 512, 64, torch.float32))
    assert crowded["reason"].endswith("; for all the SMs: no plan for 33 of the 132 SMs (4 recurrences side by side) "
                                      "pays")
    # RNN tanh H768 B256 fp16: the plan for 66 SMs fits but its step costs more than two of the
    # whole device's.
    alone = _plan(Cell.RNN_TANH, 768, 256, torch.float16)
    half = _plan(Cell.RNN_TANH, 768, 256, torch.float16, limits=dict(H100, sm_count=66))
    assert half["persistent"] and _step_ns(half) >= 2 * _step_ns(alone)
    assert same_tiling(_plan(Cell.RNN_TANH, 768, 256, torch.float16, side_by_side=2), alone)


def _pipeline(cell, T, layers, H, B, dtype, limits=H100, inference=False, max_chunks=32):
    return _C.pipeline_plan(int(cell), T, layers, H, B, dtype, True, limits["sm_count"], limits["smem_per_block"],
                            limits["compute_capability"], limits["cooperative_launch"], limits["max_cluster"],
                            inference, max_chunks)


PIPELINE_SHAPES = [(Cell.LSTM, 100, 4, 512, 64, torch.float16), (Cell.LSTM, 100, 4, 512, 64, torch.float32),
                   (Cell.LSTM, 100, 2, 512, 64, torch.float16), (Cell.GRU, 100, 4, 512, 64, torch.float16),
                   (Cell.LSTM, 256, 4, 128, 16, torch.float16), (Cell.RNN_TANH, 512, 3, 256, 1, torch.bfloat16),
                   (Cell.GRU_CHO, 16, 4, 512, 64, torch.float16), (Cell.LSTM, 3, 8, 512, 64, torch.float32),
                   (Cell.RNN_TANH, 64, 2, 768, 256, torch.float16)]


@pytest.mark.parametrize("inference", [False, True], ids=["training", "inference"])
@pytest.mark.parametrize("shape", PIPELINE_SHAPES,
                         ids=lambda s: f"{s[0].name}_T{s[1]}_L{s[2]}_H{s[3]}_B{s[4]}_{str(s[5])[6:]}")
def test_a_pipeline_takes_the_cheapest_slices_that_pay(shape, inference):
    """RNNFUSED_WAVEFRONT=auto's planner against every slice count, enumerated here from the
    layer plans: layer after layer, L launches (a forward and, in training, a backward each) and
    T steps of the plan for the whole device; over n slices, n + L - 1 rounds of a slice's
    launches and ceil(T / n) steps of the plan for min(L, n) recurrences side by side, counted
    only where those plans' CTAs fit the SMs together. The pipeline is taken where the cheapest
    is cheaper."""
    cell, T, layers, H, B, dtype = shape
    got = _pipeline(cell, T, layers, H, B, dtype, inference=inference)
    launches = got["launch_ns"] * (1 if inference else 2)
    whole = _plan(cell, H, B, dtype, inference=inference)
    layered = layers * (launches + T * _step_ns(whole))
    assert got["layered_ns"] == pytest.approx(layered, rel=1e-12)
    costs = {}
    for n in range(2, min(T, 32) + 1):
        share = _plan(cell, H, B, dtype, side_by_side=min(layers, n), inference=inference)
        if share["persistent"] and share["ctas"] * min(layers, n) <= H100["sm_count"]:
            costs[n] = (n + layers - 1) * (launches + -(-T // n) * _step_ns(share))
    if not costs:
        assert got["chunks"] == 0 and got["reason"].startswith("layer after layer: no pipeline of 2 to ")
        return
    cheapest = min(costs, key=lambda n: (costs[n], n))
    assert got["pipelined_ns"] == pytest.approx(costs[cheapest], rel=1e-12)
    if costs[cheapest] < layered:
        assert got["chunks"] == cheapest
        assert got["reason"].startswith(f"the layers pipelined over {cheapest} slices of the steps: an estimated ")
    else:
        assert got["chunks"] == 0 and got["reason"].startswith("layer after layer: an estimated ")


def test_what_a_pipeline_gains_by_the_model():
    """Where the layers' plans already fit a share of the SMs (small: one 16-CTA cluster) four
    layers pipeline at nearly the price of one; fp32 at H512, whose plan for 33 SMs does not
    pay (the whole device's 128 CTAs stay), pipelines over fewer slices than layers; with one
    step per slice or a layer that runs stepwise, layer after layer."""
    small = _pipeline(Cell.LSTM, 256, 4, 128, 16, torch.float16)
    assert small["chunks"] >= 4 and small["pipelined_ns"] < small["layered_ns"] / 2
    crowded = _pipeline(Cell.LSTM, 100, 4, 512, 64, torch.float32)
    assert 0 <= crowded["chunks"] < 4
    short = _pipeline(Cell.LSTM, 1, 4, 512, 64, torch.float16)
    assert short["chunks"] == 0 and short["reason"] == "layer after layer: a pipeline needs two layers and two steps"
    stepwise = _pipeline(Cell.LSTM, 100, 4, 512, 64, torch.float64)
    assert stepwise["chunks"] == 0 and stepwise["layered_ns"] == 0
    assert stepwise["reason"].startswith("layer after layer: stepwise: float64")
    # RNN tanh H768 B256 fp16 in training: its plan for half the SMs does not pay (the whole
    # device's stays), so no two layers' launches fit the SMs together.
    apart = _pipeline(Cell.RNN_TANH, 64, 2, 768, 256, torch.float16)
    assert apart["chunks"] == 0 and apart["pipelined_ns"] == 0
    assert apart["reason"] == "layer after layer: no pipeline of 2 to 32 slices has plans whose launches fit the SMs " \
        "together"
    # More launches cost more: with at most 2 slices, 2 is what it takes where it pays.
    assert _pipeline(Cell.LSTM, 256, 4, 128, 16, torch.float16, max_chunks=2)["chunks"] == 2


def _cell_of(mode, options):
    """The Cell number of a VARIANTS entry."""
    if mode == "LSTM":
        return int(Cell.LSTM)
    if mode == "GRU":
        return int(Cell.GRU_CHO if options.get("reset_after") is False else Cell.GRU)
    return int(Cell.RNN_RELU if options.get("nonlinearity") == "relu" else Cell.RNN_TANH)


def _candidates(cell, H, B, dtype, limits=H100, inference=False):
    """Every tiling in the planner's space (batch tiles of 16 * 2^k rows or all of B; every
    unit slice 1..H; with the grid barrier, and as clusters where 1 < unit tiles <= the
    device's cluster size, the clusters fit the GPCs at once, floor(16 / unit tiles) in each of
    sm_count // 16, and the slice is whole 4-byte words), enumerated here independently of
    plan.cpp: {(rows, units, cluster): its _C.plan_cost} for those that fit (inference: whose
    forward fits) with at most one CTA per SM."""
    rows_choices = [16 * 2 ** k for k in range(12) if 16 * 2 ** k < B] + [B]
    out = {}
    for rows in rows_choices:
        for units in range(1, H + 1):
            unit_tiles = -(-H // units)
            resident = limits["sm_count"] // 16 * (16 // unit_tiles)
            clusters = (1 < unit_tiles <= limits["max_cluster"] and -(-B // rows) <= resident
                        and units * ELEMENT[dtype] % 4 == 0)
            for cluster in (False, True) if clusters else (False,):
                cost = _C.plan_cost(int(cell), H, B, dtype, rows, units, limits["smem_per_block"], cluster)
                if cost["fits_forward" if inference else "fits"] and cost["ctas"] <= limits["sm_count"]:
                    assert (cost["cluster"] > 0) == cluster
                    out[rows, units, cluster] = cost
    return out


def _step_ns(cost):
    return cost["estimate"]["forward"]["total"] + cost["estimate"]["backward"]["total"]


@pytest.mark.parametrize("cell,H,B,dtype", [
    (Cell.LSTM, 128, 16, torch.float16), (Cell.GRU, 256, 1, torch.bfloat16), (Cell.RNN_TANH, 128, 16, torch.float16),
    (Cell.LSTM, 512, 64, torch.float16), (Cell.GRU_CHO, 96, 40, torch.float32), (Cell.LSTM, 256, 64, torch.float32),
    (Cell.RNN_RELU, 200, 3, torch.float16)])
def test_the_planner_takes_the_cheapest_tiling_that_fits(cell, H, B, dtype):
    """No tiling of the planner's space that fits is cheaper, by the cost model, than the one
    it chose (plan.cpp visits of each unit-tile count only the smallest slice and the smallest
    made of 16-byte vectors: another slice with the same count can only cost more, which this
    checks too); the plan's estimate is its tiling's, and it counts the candidates it compared."""
    plan = _plan(cell, H, B, dtype)
    assert plan["persistent"], plan["reason"]
    _check_tiling(plan, H, B, dtype, H100)
    candidates = _candidates(cell, H, B, dtype)
    chosen = candidates[plan["rows"], plan["units"], plan["cluster"] > 0]
    assert plan["estimate"] == chosen["estimate"]
    assert _step_ns(chosen) <= min(_step_ns(c) for c in candidates.values()) * (1 + 1e-12)
    assert f"cheapest of {plan['candidates']} tilings" in plan["reason"]
    # Of each count of unit tiles, the smallest slice, and the smallest of 16-byte vectors.
    kinds = len({(rows, c["unit_tiles"], cluster) for (rows, _, cluster), c in candidates.items()})
    assert kinds <= plan["candidates"] <= 2 * kinds


@pytest.mark.parametrize("cell,H,B,dtype", [
    (Cell.LSTM, 512, 64, torch.float16), (Cell.LSTM, 128, 16, torch.float32), (Cell.GRU, 128, 16, torch.float16),
    (Cell.LSTM, 256, 1, torch.float16), (Cell.GRU_CHO, 96, 40, torch.float32)])
def test_an_inference_plan_takes_the_cheapest_forward(cell, H, B, dtype):
    """Inference runs the forward alone: its plan is the tiling of the planner's space whose
    forward step the cost model estimates cheapest, whether or not the tiling's backward fits,
    never dearer than the training plan's forward, and it carries no backward estimate."""
    training = _plan(cell, H, B, dtype)
    inference = _plan(cell, H, B, dtype, inference=True)
    assert inference["persistent"] and "(inference: the forward alone)" in inference["reason"]
    assert inference["estimate"]["backward"]["total"] == 0
    forward = inference["estimate"]["forward"]["total"]
    candidates = _candidates(cell, H, B, dtype, inference=True)
    chosen = candidates[inference["rows"], inference["units"], inference["cluster"] > 0]
    assert chosen["estimate"]["forward"] == inference["estimate"]["forward"]
    assert forward <= min(c["estimate"]["forward"]["total"] for c in candidates.values()) * (1 + 1e-12)
    assert forward <= training["estimate"]["forward"]["total"] * (1 + 1e-12)


def test_inference_takes_a_forward_whose_backward_would_not_fit():
    """fastrnns LSTM fp16: the cheapest forward is 16-CTA clusters (no grid barrier), whose
    backward (all four gates' dG at once) does not fit, so the training plan could not take
    it."""
    training = _plan(Cell.LSTM, 512, 64, torch.float16)
    inference = _plan(Cell.LSTM, 512, 64, torch.float16, inference=True)
    assert training["cluster"] == 0 and inference["cluster"] == 16
    assert inference["estimate"]["forward"]["total"] < training["estimate"]["forward"]["total"]
    cost = _C.plan_cost(int(Cell.LSTM), 512, 64, torch.float16, inference["rows"], inference["units"],
                        H100["smem_per_block"], True)
    assert cost["fits_forward"] and not cost["fits"] and cost["estimate"]["backward"] is None


def test_the_cost_model_charges_what_each_tiling_does():
    smem = H100["smem_per_block"]
    one_cta = _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 128, smem)
    spread = _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 1, smem)
    assert one_cta["ctas"] == 1 and spread["ctas"] == 128
    for direction in ("forward", "backward"):
        one, many = one_cta["estimate"][direction], spread["estimate"][direction]
        # A CTA barrier closes a one-CTA step: no fence, no grid barrier.
        assert one["stores"] == 0 and one["barrier"] < 100 and many["stores"] > 0 and many["barrier"] > 1000
        # 8 elements a thread against 16 elements in 256 threads.
        assert one["cell"] > 4 * many["cell"]
        # All of W_hh times the tile, against one unit's gates.
        assert one["mma"] > many["mma"]
        assert one["total"] == pytest.approx(
            sum(one[p] for p in ("exchange", "mma", "cell", "stores", "window", "barrier")))
    # Both cell passes read their inputs from shared memory, prefetched after the arrival (the
    # one-CTA LSTM fp16 plan at H128 just fits them: 224 of 227 KB each way).
    assert one_cta["prefetch_bwd"] and max(one_cta["fwd"]["bytes"], one_cta["bwd"]["bytes"]) <= smem
    assert one_cta["estimate"]["forward"]["window"] > 0 and one_cta["estimate"]["backward"]["window"] > 0
    # The one measured constant: the grid barrier at 132 CTAs took 1.1 us on an H100.
    full = _C.plan_cost(int(Cell.RNN_TANH), 132, 16, torch.float16, 16, 1, smem)
    assert full["ctas"] == 132 and full["estimate"]["forward"]["barrier"] == pytest.approx(1100, abs=10)
    # More rows a CTA: more to pull each step; the LSTM backward pulls four gates' dG.
    rows16 = _C.plan_cost(int(Cell.LSTM), 512, 64, torch.float16, 16, 16, smem)["estimate"]
    rows64 = _C.plan_cost(int(Cell.LSTM), 512, 64, torch.float16, 64, 16, smem)["estimate"]
    assert rows64["forward"]["exchange"] > rows16["forward"]["exchange"]
    assert rows16["backward"]["exchange"] > 2 * rows16["forward"]["exchange"]
    # GRU_CHO takes two phases a step: two barriers.
    cho = _C.plan_cost(int(Cell.GRU_CHO), 128, 16, torch.float16, 16, 16, smem)["estimate"]["forward"]
    gru = _C.plan_cost(int(Cell.GRU), 128, 16, torch.float16, 16, 16, smem)["estimate"]["forward"]
    assert cho["barrier"] == pytest.approx(2 * gru["barrier"])


def test_clusters_where_the_device_has_them_and_what_the_model_charges_them():
    smem = H100["smem_per_block"]
    grid = _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 16, smem)
    cluster = _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 16, smem, True)
    assert grid["cluster"] == 0 and cluster["cluster"] == cluster["unit_tiles"] == 8
    for direction in ("forward", "backward"):
        g, c = grid["estimate"][direction], cluster["estimate"][direction]
        # The operand is already in shared memory, pushed by the peers: the exchange is the
        # Operand barrier; the wait for the peers' pushes replaces the grid barrier and its
        # fence (cheaper in all, though the backward's four gates of dG take longer through the
        # SM-to-SM network than a grid barrier of 8 CTAs); h_t / dG go to global memory after
        # the push.
        assert c["exchange"] < 50 < g["exchange"]
        assert c["barrier"] + c["stores"] + c["exchange"] < g["barrier"] + g["stores"] + g["exchange"]
        assert c["stores"] < g["stores"] and c["window"] > g["window"]
        assert c["mma"] == g["mma"] and c["cell"] == g["cell"]
    forward, backward = cluster["estimate"]["forward"], cluster["estimate"]["backward"]
    assert forward["barrier"] < grid["estimate"]["forward"]["barrier"] < backward["barrier"]
    # fp32 too: its tiles hold h_t and dG exactly (the product rounds them to TF32 as it loads
    # them), so they go to global memory after the push, and nothing waits for a fence.
    fp32 = _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float32, 16, 16, smem, True)["estimate"]["forward"]
    assert fp32["stores"] < 50 and fp32["window"] >= cluster["estimate"]["forward"]["window"]
    # A cluster takes every gate's dG at once, in two tiles: where they do not fit, the tiling
    # does not, though the grid barrier's (one tile, fewer gates at a time) does.
    tight = cluster["bwd"]["inputs"] - 1  # the layout's bytes without the prefetched inputs, less one
    assert not _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 16, tight, True)["fits"]
    assert _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 16, tight)["fits"]
    # The planner: clusters on an H100 where the model finds them cheaper; none on an A100, nor
    # with none allowed (RNNFUSED_PERSISTENT_CLUSTERS=0); no cooperative launch needed.
    small = _plan(Cell.LSTM, 128, 16, torch.float16)
    assert small["cluster"] > 0 and "exchanging through distributed shared memory" in small["reason"]
    assert _plan(Cell.LSTM, 128, 16, torch.float16, limits=A100)["cluster"] == 0
    assert _plan(Cell.LSTM, 128, 16, torch.float16, limits=dict(H100, max_cluster=0))["cluster"] == 0
    assert _plan(Cell.LSTM, 128, 16, torch.float16, limits=dict(H100, cooperative_launch=False))["cluster"] > 0
    with environment(**simulation(), RNNFUSED_PERSISTENT_CLUSTERS=0):
        assert _C.layer_plan(int(Cell.LSTM), 10, 128, 16, torch.float16, "cpu")["cluster"] == 0
    # A cluster's pushes are whole 4-byte words (st.async): 2-byte elements need an even slice;
    # the last slice of an odd H takes its padding column along.
    assert _C.plan_cost(int(Cell.GRU), 13, 7, torch.float16, 7, 5, smem, True)["cluster"] == 0
    assert _C.plan_cost(int(Cell.GRU), 13, 7, torch.float16, 7, 6, smem, True)["cluster"] == 3
    assert _C.plan_cost(int(Cell.GRU), 13, 7, torch.float32, 7, 5, smem, True)["cluster"] == 3
    # More unit tiles than a cluster may have (16 on sm_90, not portable; the launch allows
    # it): the grid barrier. RNNFUSED_PERSISTENT_CLUSTERS=n caps a cluster at n CTAs.
    wide = _plan(Cell.RNN_TANH, 512, 64, torch.float16)
    assert wide["unit_tiles"] <= 16 or wide["cluster"] == 0
    for cap, cluster in ((None, 16), (16, 16), (8, 0), (0, 0)):
        with environment(**simulation(tiling="16x4"), RNNFUSED_PERSISTENT_CLUSTERS=cap):
            assert _C.layer_plan(int(Cell.LSTM), 10, 64, 16, torch.float16, "cpu")["cluster"] == cluster
    with environment(**simulation(), RNNFUSED_PERSISTENT_CLUSTERS="many"), \
            pytest.raises(ValueError, match="RNNFUSED_PERSISTENT_CLUSTERS must be the most CTAs"):
        _C.layer_plan(int(Cell.LSTM), 10, 64, 16, torch.float16, "cpu")


def test_w_in_registers_where_each_warp_holds_few_fragments():
    smem = H100["smem_per_block"]
    small = _plan(Cell.LSTM, 128, 16, torch.float16)
    assert small["held_fwd"] > 0 and small["held_bwd"] > 0 and "W in registers both ways" in small["reason"]
    # 16 units a CTA: 4 fragments a warp; TF32 MMAs are half as deep, so fp32 holds twice as many.
    for dtype, held in ((torch.float16, 4), (torch.float32, 8)):
        tiling = _C.plan_cost(int(Cell.LSTM), 128, 16, dtype, 16, 16, smem, True)
        assert (tiling["held_fwd"], tiling["held_bwd"]) == (held, held)
    # fastrnns: 32 units a CTA would be 32 fragments a warp, too many; 16 units are 16.
    wide = _C.plan_cost(int(Cell.LSTM), 512, 64, torch.float16, 16, 32, smem)
    narrow = _C.plan_cost(int(Cell.LSTM), 512, 64, torch.float16, 16, 16, smem)
    assert wide["held_fwd"] == wide["held_bwd"] == 0 and (narrow["held_fwd"], narrow["held_bwd"]) == (16, 16)
    cho = _plan(Cell.GRU_CHO, 128, 16, torch.float16)  # two products of parts of W a phase
    assert cho["held_fwd"] == cho["held_bwd"] == 0
    for plan in (small, cho):
        _check_held(plan, Cell.LSTM if plan is small else Cell.GRU_CHO, torch.float16)
    off = _plan(Cell.LSTM, 128, 16, torch.float16, hold=False)
    assert off["held_fwd"] == off["held_bwd"] == 0 and "registers" not in off["reason"]
    for setting, held in ((None, True), ("0", False)):
        with environment(**simulation(), RNNFUSED_PERSISTENT_HELD_W=setting):
            assert (_C.layer_plan(int(Cell.LSTM), 10, 128, 16, torch.float16, "cpu")["held_fwd"] > 0) == held
    # The model: the products no longer read W's fragments from shared memory, only the
    # operand's; nothing else changes.
    held = _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 16, smem, True)
    shared = _C.plan_cost(int(Cell.LSTM), 128, 16, torch.float16, 16, 16, smem, True, hold_weights=False)
    assert held["held_fwd"] > 0 and shared["held_fwd"] == 0
    for direction in ("forward", "backward"):
        h, s = held["estimate"][direction], shared["estimate"][direction]
        assert h["mma"] < s["mma"]
        assert all(h[p] == s[p] for p in ("exchange", "cell", "stores", "window", "barrier"))


def test_the_backward_prefetches_its_inputs_where_they_fit_beside_the_whole_dg_tile():
    smem = H100["smem_per_block"]
    for cell, dtype in [(Cell.LSTM, torch.float16), (Cell.GRU, torch.float32), (Cell.RNN_RELU, torch.bfloat16)]:
        two = _C.plan_cost(int(cell), 128, 16, dtype, 16, 64, smem)  # half of Wᵀ a CTA: room to spare
        assert two["fits"] and two["prefetch_bwd"]
        # dy (and h) in S; the saved gates in A, which an RNN has none of.
        assert two["bwd"]["bytes"] > two["bwd"]["narrow"] >= two["bwd"]["inputs"] > 0
        assert (two["bwd"]["narrow"] > two["bwd"]["inputs"]) == (cell != Cell.RNN_RELU)
        # Its pass reads shared memory (no load latency per element); the prefetch is issued in
        # the window between arrival and wait.
        backward = two["estimate"]["backward"]
        assert backward["window"] > 0 and backward["cell"] < 2 * two["estimate"]["forward"]["cell"]
    # Where the inputs fit only if the dG tile took fewer gates at a time, they are not
    # prefetched: the pass then waits on a load per element and nothing follows the arrival.
    whole = _C.plan_cost(int(Cell.LSTM), 512, 64, torch.float32, 16, 16, smem)
    tight = _C.plan_cost(int(Cell.LSTM), 512, 64, torch.float32, 16, 16, whole["bwd"]["bytes"] - 1)
    assert whole["prefetch_bwd"] and not tight["prefetch_bwd"] and tight["chunk_gates"] == whole["chunk_gates"]
    assert tight["bwd"]["inputs"] == tight["bwd"]["narrow"] == tight["bwd"]["bytes"]  # empty, at the end
    assert tight["estimate"]["backward"]["window"] == 0
    assert tight["estimate"]["backward"]["cell"] > whole["estimate"]["backward"]["cell"] + 200


def test_spread_keeps_stage_2s_rule_and_a_tiling_can_be_forced():
    spread = _plan(Cell.LSTM, 128, 64, torch.float16, spread=True)
    assert spread["persistent"] and spread["ctas"] > 100 and "spread over the SMs" in spread["reason"]
    with environment(RNNFUSED_KERNEL="simulate", RNNFUSED_PERSISTENT_TILING="16x128"):
        forced = _C.layer_plan(int(Cell.LSTM), 10, 128, 64, torch.float16, "cpu")
        assert forced["unit_tiles"] == 1 and forced["row_tiles"] == 4 and "no grid barrier" in forced["reason"]
        assert "forced by RNNFUSED_PERSISTENT_TILING=16x128" in forced["reason"]
        assert forced["estimate"] == _C.plan_cost(int(Cell.LSTM), 128, 64, torch.float16, 16, 128,
                                                  H100["smem_per_block"])["estimate"]
    for tiling, why in [("16x512", "does not fit"), ("1x1", "more than the SMs")]:
        with environment(RNNFUSED_KERNEL="simulate", RNNFUSED_PERSISTENT_TILING=tiling):
            refused = _C.layer_plan(int(Cell.LSTM), 10, 512, 64, torch.float16, "cpu")
            assert refused["kernel"] == "stepwise" and why in refused["reason"], refused["reason"]
    for bad in ("16", "16x", "x8", "0x8", "16x8x2", "sixteen"):
        with environment(RNNFUSED_KERNEL="simulate", RNNFUSED_PERSISTENT_TILING=bad), \
                pytest.raises(ValueError, match="RNNFUSED_PERSISTENT_TILING must be ROWSxUNITS"):
            _C.layer_plan(int(Cell.LSTM), 10, 64, 8, torch.float16, "cpu")


def test_kept_plans_answer_the_question_asked_each_time():
    """The layer plans are made once per question and kept (kernel_choice.cpp): a setting that
    changes the plan changes the answer, and going back gives the first answer again."""
    def tiling(**settings):
        with environment(RNNFUSED_KERNEL="simulate", **settings):
            plan = _C.layer_plan(int(Cell.LSTM), 10, 128, 64, torch.float16, "cpu")
            return plan["kernel"], plan["rows"], plan["units"], plan["cluster"], plan["reason"]

    first = tiling()
    answers = [tiling(RNNFUSED_PERSISTENT_TILING="16x128"), tiling(RNNFUSED_PERSISTENT_TILING="32x64"),
               tiling(RNNFUSED_PERSISTENT_CLUSTERS="0"), tiling(RNNFUSED_PERSISTENT_SPREAD="1"),
               tiling(RNNFUSED_PERSISTENT_SMEM_KB="100")]
    assert len({first, *answers}) == 6, answers
    assert tiling() == first and tiling(RNNFUSED_PERSISTENT_TILING="16x128") == answers[0]


def test_more_row_tiles_only_when_the_weights_fit():
    """Stage 2's rule: the batch tile is the smallest whose replicated weight slices fit."""
    small = _plan(Cell.RNN_TANH, 128, 256, torch.float16, spread=True)
    assert small["persistent"] and small["rows"] == 16
    tight = _plan(Cell.LSTM, 1024, 64, torch.float16, spread=True)
    if tight["persistent"]:
        assert tight["rows"] >= 16


# --- the host simulation against the reference -----------------------------------------

MODULES = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN": rnnfused.RNN}
VARIANTS = [("LSTM", {}), ("LSTM", {"cell_clip": 0.3, "grad_clip": 0.2}), ("GRU", {}), ("GRU", {"grad_clip": 0.2}),
            ("GRU", {"reset_after": False}), ("GRU", {"reset_after": False, "grad_clip": 0.2}),
            ("RNN", {}), ("RNN", {"nonlinearity": "relu", "grad_clip": 0.2})]


def _module(mode, options, input_size, hidden, dtype, **kwargs):
    torch.manual_seed(0)
    module = MODULES[mode](input_size, hidden, **options, **kwargs).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2)  # large enough that the clips fire
    return module


def _run(module, steps, batch, dtype, packed, forward=None, seed=3):
    """Outputs, final states and the gradients of the input and every parameter of
    forward(x) (default: the module) for fixed random input; packed with random lengths."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=g).tolist()
        lengths[0] = steps
        leaves = [torch.randn(n, module.input_size, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                  for n in lengths]
        x = pack_sequence(leaves, enforce_sorted=False)
    else:
        x = torch.randn(steps, batch, module.input_size, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        leaves = [x]
    values = flatten((forward or module)(x))
    loss = sum((v.double() * torch.linspace(-1, 1, v.numel(), dtype=torch.float64).view_as(v)).sum() for v in values)
    return [v.detach() for v in values] + list(torch.autograd.grad(loss, leaves + list(module.parameters())))


def simulation(sms=None, smem_kb=None, spread=False, tiling=None):
    """The RNNFUSED_* settings (for environment) of the host simulation on a device of `sms`
    multiprocessors with `smem_kb` of shared memory per block (None: an H100's), planned by
    stage 2's rule (`spread`), a forced ROWSxUNITS `tiling`, or the cost model."""
    return dict(RNNFUSED_KERNEL="simulate", RNNFUSED_PERSISTENT_SMS=sms, RNNFUSED_PERSISTENT_SMEM_KB=smem_kb,
                RNNFUSED_PERSISTENT_SPREAD=1 if spread else None, RNNFUSED_PERSISTENT_TILING=tiling)


def _simulated(module, steps, batch, dtype, packed, sms=None, smem_kb=None, spread=False):
    with environment(**simulation(sms, smem_kb, spread)):
        probe = torch.zeros(steps, batch, module.input_size, dtype=dtype)
        assert all(c.kernel == "persistent (host simulation)" for c in rnnfused.explain(module, probe))
        return _run(module, steps, batch, dtype, packed)


def _exact(module, steps, batch, packed):
    """The reference equations in float64 with the module's parameters."""
    double = copy.deepcopy(module).double()
    return _run(double, steps, batch, torch.float64, packed,
                forward=lambda x: rnnfused.reference.forward(double, x))


# (steps, batch, input, hidden, layers, bidirectional, packed, SMs, shared KB, spread): odd
# sizes, B = 1, T = 1, one CTA per batch tile (these H fit one CTA) and, spread, several row and
# unit tiles (fewer SMs force wider slices; more rows force row tiles), little shared memory
# (the backward takes its dG tile one or two gates at a time).
SHAPES = [(5, 3, 4, 7, 1, False, False, None, None, False), (1, 1, 3, 5, 1, False, False, None, None, False),
          (6, 37, 5, 19, 2, True, False, 9, None, False), (6, 37, 5, 19, 2, True, False, 9, None, True),
          (7, 20, 3, 33, 1, True, True, 4, None, True), (4, 1, 2, 3, 2, True, True, 2, None, True),
          (3, 50, 6, 18, 1, False, True, 132, None, True), (5, 18, 3, 40, 1, True, True, 3, 68, True)]


@pytest.mark.parametrize("mode,options", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_simulated_kernel_matches_reference_in_float64(mode, options, shape):
    steps, batch, inputs, hidden, layers, bidirectional, packed, sms, smem_kb, spread = shape
    module = _module(mode, options, inputs, hidden, torch.float64, num_layers=layers, bidirectional=bidirectional)
    if smem_kb:
        plan = _C.plan(0 if mode == "LSTM" else 1, hidden, hidden, batch, torch.float64, True, sms, smem_kb * 1024,
                       90, True, True, spread)
        assert plan["persistent"] and plan["chunk_gates"] < (4 if mode == "LSTM" else 3), plan
    simulated = _simulated(module, steps, batch, torch.float64, packed, sms, smem_kb, spread)
    assert max_error(simulated, _exact(module, steps, batch, packed)) <= 1e-10


@pytest.mark.parametrize("mode,options", VARIANTS[::2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_simulated_kernel_in_low_precision(mode, options, dtype):
    """fp16/bf16 operands and TF32 products (fp32) as on the GPU, fp32 accumulation: no
    worse than twice the stepwise kernels' error in the same dtype, against float64."""
    module = _module(mode, options, 5, 24, dtype, bidirectional=True)
    exact = _exact(module, 9, 6, False)
    simulated = max_error(_simulated(module, 9, 6, dtype, False), exact)
    with environment(RNNFUSED_KERNEL="stepwise"):
        stepwise = max_error(_run(module, 9, 6, dtype, False), exact)
    tf32 = 2.0 ** -11 if dtype == torch.float32 else 0  # the stepwise CPU kernels do not round to TF32
    assert simulated <= 2 * stepwise + 8 * tf32 + 4 * torch.finfo(dtype).eps, (simulated, stepwise)


# (hidden, batch): the planner's GPU choice (fp16, bf16, fp32 as TF32) at small shapes.
GPU_PLANS = [(128, 16), (256, 1), (64, 40), (40, 3)]


@pytest.mark.parametrize("mode,options", VARIANTS[::2] + [("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("hidden,batch", GPU_PLANS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_plans_the_gpu_would_run_simulated_in_their_dtype(mode, options, hidden, batch, dtype):
    """The tiling the planner picks for an H100 at these shapes, simulated in the GPU's dtype
    (fp32 products as TF32): no worse than twice the stepwise kernels' error against float64,
    or, for ReLU in TF32, than stage 2's tiling. There TF32's rounding flips the sign of
    pre-activations near zero, and with it whole terms of the gradient (1e-2 at H128 B16, in
    every tiling alike), which the stepwise CPU kernels, without TF32, do not."""
    module = _module(mode, options, 6, hidden, dtype)
    with environment(RNNFUSED_KERNEL="simulate"):
        simulated_plan = _C.layer_plan(_cell_of(mode, options), 3, hidden, batch, dtype, "cpu")
        simulated = _run(module, 3, batch, dtype, False)
    gpu_plan = _plan(_cell_of(mode, options), hidden, batch, dtype)
    assert simulated_plan["kernel"] == "persistent (host simulation)", simulated_plan["reason"]
    assert [simulated_plan[k] for k in ("rows", "units", "ctas")] == [gpu_plan[k] for k in ("rows", "units", "ctas")]
    exact = _exact(module, 3, batch, False)
    with environment(RNNFUSED_KERNEL="stepwise"):
        stepwise = max_error(_run(module, 3, batch, dtype, False), exact)
    tf32 = 2.0 ** -11 if dtype == torch.float32 else 0
    bound = 2 * stepwise + 8 * tf32 + 4 * torch.finfo(dtype).eps
    if dtype == torch.float32 and options.get("nonlinearity") == "relu":
        with environment(RNNFUSED_KERNEL="simulate", RNNFUSED_PERSISTENT_SPREAD=1):
            bound = max(bound, 1.01 * max_error(_run(module, 3, batch, dtype, False), exact))
    assert max_error(simulated, exact) <= bound


@pytest.mark.parametrize("mode,options", VARIANTS)
def test_persistent_and_stepwise_halves_combine(mode, options):
    """The saved activations have stage 1's layout: a simulated forward with a stepwise
    backward, and the other way round, give the gradients of either alone."""
    module = _module(mode, options, 3, 9, torch.float64, num_layers=2, bidirectional=True)
    results = {}
    for forward_kernel, backward_kernel in itertools.product(("simulate", "stepwise"), repeat=2):
        x = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with environment(RNNFUSED_KERNEL=forward_kernel):
            values = flatten(module(x))
        loss = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in values)
        with environment(RNNFUSED_KERNEL=backward_kernel):
            results[forward_kernel, backward_kernel] = values + list(
                torch.autograd.grad(loss, [x] + list(module.parameters())))
    reference = results["stepwise", "stepwise"]
    for key, result in results.items():
        assert max_error([r.detach() for r in result], [r.detach() for r in reference]) <= 1e-12, key


def test_simulation_without_grad_and_the_cells():
    module = _module("LSTM", {}, 4, 10, torch.float64)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = flatten(module(x))
        with environment(RNNFUSED_KERNEL="simulate"):
            assert max_error(flatten(module(x)), expected) <= 1e-12
    cell = rnnfused.GRUCell(4, 10).double()
    h = torch.randn(3, 10, dtype=torch.float64)
    expected = cell(x[0], h)
    with environment(RNNFUSED_KERNEL="simulate"):
        assert rnnfused.explain(cell, x[0])[0].kernel == "persistent (host simulation)"
        assert max_error([cell(x[0], h)], [expected]) <= 1e-12


@pytest.mark.parametrize("cell,hidden", [(Cell.LSTM, 64), (Cell.GRU, 96)])
def test_a_layer_side_by_side_runs_the_plan_for_its_share(cell, hidden):
    """The operators plan by their options' side_by_side: on a device of 8 SMs (as the host
    simulation plans it), the layer takes more than 4 CTAs alone and the plan for 4 SMs beside
    another recurrence, and the simulated kernel computes it, forward and backward, as the
    stepwise kernels do, either way."""
    gates = 4 if cell == Cell.LSTM else 3
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, 6, dtype=torch.float64, generator=g, requires_grad=True)
    h0 = torch.randn(16, hidden, dtype=torch.float64, generator=g)
    c0 = torch.randn(16, hidden, dtype=torch.float64, generator=g) if cell == Cell.LSTM else None
    weights = [(0.2 * torch.randn(shape, dtype=torch.float64, generator=g)).requires_grad_()
               for shape in ((gates * hidden, 6), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,))]
    results = {}
    with environment(RNNFUSED_PERSISTENT_SMS=8):
        for kernel, side_by_side in (("stepwise", 1), ("simulate", 1), ("simulate", 2)):
            with environment(RNNFUSED_KERNEL=kernel):
                plan = _C.layer_plan(int(cell), 5, hidden, 16, torch.float64, "cpu", side_by_side)
                if kernel == "simulate":
                    assert (plan["ctas"] > 4) == (side_by_side == 1) and plan["ctas"] <= 8, plan["reason"]
                    assert ("planned for 4 of the 8 SMs (2 recurrences side by side)" in plan["reason"]) == \
                        (side_by_side == 2)
                options = _ops.LayerOptions(cell, reverse=True, side_by_side=side_by_side)
                y, h_n, c_n, _ = _ops.differentiable_layer_forward(options, x, None, h0, c0, weights)
                values = [y, h_n] + ([c_n] if c_n is not None else [])
                loss = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in values)
                results[kernel, side_by_side] = values + list(torch.autograd.grad(loss, [x] + weights))
    for key in (("simulate", 1), ("simulate", 2)):
        assert max_error([r.detach() for r in results[key]],
                         [r.detach() for r in results["stepwise", 1]]) <= 1e-12, key


@pytest.mark.parametrize("mode,hidden,tiling", [("LSTM", 64, "16 CTAs = 16 x 4 units"),
                                                 ("RNN", 48, "1 CTAs = 1 x 48 units")])
def test_inference_runs_its_own_plan(mode, hidden, tiling):
    """Under torch.no_grad the layers take the inference plan, here another tiling than
    training's (LSTM: a cluster of 16 CTAs; RNN: one CTA), and the simulated kernel computes the
    forward as the stepwise kernels do."""
    module = _module(mode, {}, 5, hidden, torch.float64, bidirectional=True)
    x = torch.randn(7, 16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with environment(RNNFUSED_KERNEL="simulate"):
        training = [c.reason for c in rnnfused.explain(module, x)]
        with torch.no_grad():
            inference = [c.reason for c in rnnfused.explain(module, x)]
            simulated = flatten(module(x))
    assert all(f"persistent: {tiling}" in r and "(inference: the forward alone)" in r for r in inference), inference
    assert not any(f"persistent: {tiling}" in r or "inference" in r for r in training), training
    with environment(RNNFUSED_KERNEL="stepwise"), torch.no_grad():
        assert max_error(simulated, flatten(module(x))) <= 1e-12


def test_kernel_setting_errors_and_explanations():
    module = rnnfused.LSTM(3, 4)
    x = torch.randn(9, 1, 3)
    with environment(RNNFUSED_KERNEL="fastest"), pytest.raises(ValueError, match="must be auto, cudnn, ours, stepwise"):
        module(x)
    assert "CPU thread" in rnnfused.explain(module, x)[0].reason
    assert "fewer than 8 steps" in rnnfused.explain(module, x[:2])[0].reason
    with environment(RNNFUSED_KERNEL="stepwise"):
        assert rnnfused.explain(module, x)[0].kernel == "stepwise"
    projected = rnnfused.LSTM(3, 4, proj_size=2)
    with environment(RNNFUSED_KERNEL="persistent"), pytest.raises(RuntimeError, match="projection"):
        projected(x)
    with environment(RNNFUSED_KERNEL="simulate"):
        assert "projection" in str(rnnfused.explain(projected, x)[0])
        assert torch.equal(projected(x)[0], projected(x)[0])  # stepwise: runs


# --- on CPU threads -----------------------------------------------------------------------

@contextlib.contextmanager
def threads(count):
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# (steps, batch, input, hidden, layers, bidirectional, packed): hidden sizes that are not a
# multiple of a vector, B = 1, batches past the 8-row register block, packed, deep.
CPU_SHAPES = [(9, 3, 4, 7, 1, False, False), (8, 1, 3, 33, 1, True, False), (10, 37, 5, 19, 2, True, False),
              (12, 20, 3, 40, 1, True, True), (8, 9, 6, 130, 1, False, True)]


@pytest.mark.parametrize("mode,options", VARIANTS)
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_cpu_threads_match_reference_in_float64(mode, options, shape, count):
    steps, batch, inputs, hidden, layers, bidirectional, packed = shape
    module = _module(mode, options, inputs, hidden, torch.float64, num_layers=layers, bidirectional=bidirectional)
    with threads(count), environment(RNNFUSED_KERNEL="persistent"):
        probe = torch.zeros(steps, batch, inputs, dtype=torch.float64)
        assert all("CPU thread" in c.reason for c in rnnfused.explain(module, probe))
        results = _run(module, steps, batch, torch.float64, packed)
    assert max_error(results, _exact(module, steps, batch, packed)) <= 1e-10


@pytest.mark.parametrize("mode,options", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_threads_in_half_precision_no_worse_than_stage_1(mode, options, dtype):
    """float16 / bfloat16 multiply in float32 panels on the threads; against the float64
    reference they are no less accurate than stage 1 (which forms its products in the
    storage dtype), and independent of the thread count."""
    module = _module(mode, options, 5, 70, dtype, bidirectional=True)
    exact = _exact(module, 11, 13, True)
    with environment(RNNFUSED_KERNEL="stepwise"):
        stepwise = _run(module, 11, 13, dtype, True)
    by_threads = []
    for count in (1, 2):
        with threads(count), environment(RNNFUSED_KERNEL="persistent"):
            assert all("CPU thread" in c.reason for c in rnnfused.explain(module, torch.zeros(11, 13, 5, dtype=dtype)))
            by_threads.append(_run(module, 11, 13, dtype, True))
    assert max_error(by_threads[0], exact) <= 1.5 * max_error(stepwise, exact) + 4 * torch.finfo(dtype).eps
    assert all(torch.equal(a, b) for a, b in zip(by_threads[0], by_threads[1]))


@pytest.mark.parametrize("mode,options", VARIANTS[::2])
def test_cpu_threads_in_float32_and_independent_of_the_thread_count(mode, options):
    module = _module(mode, options, 5, 70, torch.float32, bidirectional=True)
    with environment(RNNFUSED_KERNEL="stepwise"):
        stepwise = _run(module, 11, 13, torch.float32, True)
    by_threads = []
    for count in (1, 2, 3):
        with threads(count), environment(RNNFUSED_KERNEL="persistent"):
            by_threads.append(_run(module, 11, 13, torch.float32, True))
    assert max_error(by_threads[0], stepwise) <= 2e-5
    for other in by_threads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(by_threads[0], other))


# --- on the GPU ---------------------------------------------------------------------------

GPU_CONFIGS = [(20, 16, 64, 64, "LSTM"), (12, 1, 32, 256, "GRU"), (9, 40, 48, 96, "RNN"), (15, 24, 16, 80, "GRU_CHO")]


def _gpu_module(mode, inputs, hidden, dtype):
    options = {"reset_after": False} if mode == "GRU_CHO" else {}
    return _module("GRU" if mode == "GRU_CHO" else mode, options, inputs, hidden, dtype, bidirectional=True).cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: c[-1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_persistent_kernel_matches_reference_and_stage_1(config, dtype, packed):
    steps, batch, inputs, hidden, mode = config
    module = _gpu_module(mode, inputs, hidden, dtype)
    with tf32_switch("allow_tf32", dtype == torch.float32):
        with environment(RNNFUSED_KERNEL="persistent"):
            assert all(c.kernel == "persistent" for c in rnnfused.explain(module, torch.zeros(
                steps, batch, inputs, dtype=dtype, device="cuda")))
            persistent = _run_cuda(module, steps, batch, dtype, packed)
        with environment(RNNFUSED_KERNEL="stepwise"):
            stepwise = _run_cuda(module, steps, batch, dtype, packed)
    exact = _exact(module.cpu(), steps, batch, packed)
    module.cuda()
    errors = [max_error([v.cpu() for v in r], exact) for r in (persistent, stepwise)]
    tf32 = 2.0 ** -11 if dtype == torch.float32 else 0
    assert errors[0] <= 2 * errors[1] + 8 * tf32 + 4 * torch.finfo(dtype).eps, errors


@pytest.mark.cuda
def test_gpu_directions_side_by_side_on_their_share_of_the_sms():
    """fastrnns' shape as a bidirectional LSTM in fp16: on a GPU whose plan for the whole
    device takes more than half its SMs, each direction beside the other plans for half of them
    (explain says so), the two launches run at once on two streams, and the results are as
    close to the exact ones as one stream's with plans for the whole device (a launch that could
    not start beside the other would trap its grid barrier after 10 s and raise here)."""
    module = _gpu_module("LSTM", 64, 512, torch.float16)
    x = torch.zeros(6, 64, 64, dtype=torch.float16, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {}
    with environment(RNNFUSED_KERNEL="persistent"):
        for setting in ("0", "1"):
            with environment(RNNFUSED_CONCURRENT_DIRECTIONS=setting):
                reasons = [c.reason for c in rnnfused.explain(module, x)]
                results[setting] = _run_cuda(module, 6, 64, torch.float16, False)
            shared = f"planned for {sms // 2} of the {sms} SMs (2 recurrences side by side)"
            assert all((shared in reason) == (setting == "1") for reason in reasons), reasons
    exact = _exact(module.cpu(), 6, 64, False)
    errors = {setting: max_error([v.cpu() for v in r], exact) for setting, r in results.items()}
    assert errors["1"] <= 2 * errors["0"] + 4 * torch.finfo(torch.float16).eps, errors


def _run_cuda(module, steps, batch, dtype, packed):
    g = torch.Generator().manual_seed(3)
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=g).tolist()
        lengths[0] = steps
        leaves = [torch.randn(n, module.input_size, generator=g, dtype=torch.float64).to("cuda", dtype)
                  .requires_grad_() for n in lengths]
        x = pack_sequence(leaves, enforce_sorted=False)
    else:
        x = torch.randn(steps, batch, module.input_size, generator=g, dtype=torch.float64).to("cuda", dtype) \
            .requires_grad_()
        leaves = [x]
    values = flatten(module(x))
    loss = sum((v.double() * torch.linspace(-1, 1, v.numel(), dtype=torch.float64, device="cuda").view_as(v)).sum()
               for v in values)
    return [v.detach() for v in values] + list(torch.autograd.grad(loss, leaves + list(module.parameters())))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "GRU_CHO", "RNN"])
def test_gpu_persistent_backward_is_bitwise_repeatable(mode):
    module = _gpu_module(mode, 16, 64, torch.float16)
    x = torch.randn(30, 8, 16, device="cuda", dtype=torch.float16, requires_grad=True)
    with environment(RNNFUSED_KERNEL="persistent"):
        output = module(x)[0]
        weight = torch.randn_like(output)
        first = torch.autograd.grad(output, [x] + list(module.parameters()), weight, retain_graph=True)
        second = torch.autograd.grad(output, [x] + list(module.parameters()), weight)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.cuda
def test_gpu_persistent_kernels_do_not_spill():
    info = _C.persistent_kernel_info()
    assert len(info) == 6
    assert all(k["local_bytes"] == 0 for k in info), info


@pytest.mark.cuda
def test_gpu_refused_launch_falls_back_to_stage_1(capfd):
    """Planned for far more SMs than the GPU has: the cooperative launch is refused, stage 1
    runs and says so, and the results are right. The warning is torch's C++ warning, which
    an operator called through torch.ops prints on stderr (seen on an H100 with torch 2.11)
    rather than raising as a Python warning; set_warn_always shows it again after a first
    time in the same process."""
    module = _gpu_module("LSTM", 64, 512, torch.float16)
    x = torch.randn(10, 64, 64, device="cuda", dtype=torch.float16)
    with environment(RNNFUSED_KERNEL="stepwise"), torch.no_grad():
        expected = flatten(module(x))
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with environment(RNNFUSED_KERNEL="persistent", RNNFUSED_PERSISTENT_SMS=100000), torch.no_grad(), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            actual = flatten(module(x))
    finally:
        torch.set_warn_always(warn_always)
    messages = capfd.readouterr().err + "".join(str(w.message) for w in caught)
    assert "could not be launched" in messages
    assert max_error(actual, expected) == 0


@pytest.mark.cuda
def test_gpu_counter_barrier_runs_on_every_sm_and_again_on_its_stream():
    """The persistent kernel's own grid barrier (csrc/persistent/grid_barrier.cuh) in the
    barrier microbenchmark: one CTA per SM, twice on one stream, whose counter the second
    launch must find cleared (a hang would trap after 10 s and raise here)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for _ in range(2):
        assert 0 < _C.barrier_microseconds("counter", sms, 1, 200) < 1e4


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["cluster", "exchange"])
def test_gpu_cluster_barrier_and_exchange_run_in_every_cluster(kind):
    """The cluster barrier, and the cluster plans' exchange (st.async into every peer, each CTA
    waiting on its own mbarrier for the bytes it expects; grid_barrier.cuh) of 16 bytes and of
    4 KB, one CTA per SM, in clusters of 2 to 16 (beyond the portable 8, as the planner's
    plans may be), as many as run at once: a byte count or mbarrier phase gone wrong would
    hang, trap after 10 s and raise here (sm_90)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need compute capability 9.0")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for cluster in (2, 4, 8, 16):
        for payload in (16, 4096) if kind == "exchange" else (16,):
            resident = _C.co_resident_clusters(kind, cluster, payload)
            assert resident >= 1, f"no cluster of {cluster} CTAs fits"
            ctas = min(sms // cluster, resident) * cluster
            assert 0 < _C.barrier_microseconds(kind, ctas, cluster, 201, payload) < 1e4
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        _C.barrier_microseconds("exchange", 8, 8, 1, 8)
    with pytest.raises(ValueError, match="not whole clusters"):
        _C.barrier_microseconds(kind, 12, 8, 1)
    with pytest.raises(ValueError, match="has no clusters"):
        _C.co_resident_clusters("grid", 8)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "GRU_CHO", "RNN"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("packed,tiling", [(False, "16x16"), (True, "16x16"), (True, "16x4")],
                         ids=["cluster4", "cluster4-packed", "cluster16-packed"])
def test_gpu_cluster_plans_compute_what_the_grid_barriers_do(mode, dtype, packed, tiling):
    """The same tiling as thread-block clusters exchanging through distributed shared memory
    and with the grid barrier through global memory: the same products of the same operands,
    so the same results bit for bit (sm_90), in clusters of 4 and of 16 CTAs (beyond the
    portable 8: the launch must allow it)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need compute capability 9.0")
    module = _gpu_module(mode, 24, 64, dtype)
    results = {}
    for clusters in (None, 0):
        with tf32_switch("allow_tf32", dtype == torch.float32), environment(
                RNNFUSED_KERNEL="persistent", RNNFUSED_PERSISTENT_TILING=tiling, RNNFUSED_PERSISTENT_CLUSTERS=clusters):
            choices = rnnfused.explain(module, torch.zeros(10, 20, 24, dtype=dtype, device="cuda"))
            assert all(("distributed shared memory" in c.reason) == (clusters is None) for c in choices), choices
            results[clusters] = _run_cuda(module, 10, 20, dtype, packed)
    assert all(torch.equal(a, b) for a, b in zip(results[None], results[0]))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden,tiling,clusters", [
    (64, "16x16", None), (128, "16x32", None), (128, "16x32", 0), (None, "one_cta", 0)],
    ids=["H64-cluster", "H128-cluster", "H128-grid", "one_cta"])
def test_gpu_w_in_registers_computes_what_shared_memory_does(mode, dtype, hidden, tiling, clusters):
    """The same plan with W's fragments held in registers and read from shared memory by every
    product (RNNFUSED_PERSISTENT_HELD_W=0): the same MMAs into the same two chains a job, so
    the same results bit for bit, forward and backward, packed. 2 to 4 fragments a warp at
    H64, 8 to 16 at H128 (LSTM fp32: the most a warp can hold); one_cta gives the warps of LSTM
    and GRU two or three jobs each, and in fp16/bf16 an odd number of MMAs a job (H48: 3 K
    tiles; fp32, whose MMAs come in pairs, takes H32 to stay within 16 fragments)."""
    if clusters is None and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need compute capability 9.0")
    if tiling == "one_cta":
        hidden = 32 if dtype == torch.float32 else 48
        tiling = f"32x{hidden}"
    module = _gpu_module(mode, 24, hidden, dtype)
    results = {}
    for held in (None, 0):
        with tf32_switch("allow_tf32", dtype == torch.float32), environment(
                RNNFUSED_KERNEL="persistent", RNNFUSED_PERSISTENT_TILING=tiling, RNNFUSED_PERSISTENT_CLUSTERS=clusters,
                RNNFUSED_PERSISTENT_HELD_W=held):
            choices = rnnfused.explain(module, torch.zeros(10, 20, 24, dtype=dtype, device="cuda"))
            assert all(("W in registers both ways" in c.reason) == (held is None) for c in choices), choices
            results[held] = _run_cuda(module, 10, 20, dtype, True)
    assert all(torch.equal(a, b) for a, b in zip(results[None], results[0]))
