"""The host simulation's race checker (csrc/persistent/host.h). It gives every access of the
persistent CTA program the simulated thread (or warp) that makes it on the GPU and flags two
threads of a CTA touching the same bytes with no CTA barrier between, two CTAs touching the
same global bytes with no grid barrier ordering the two, and plain loads of another CTA's data.

The real program passes it for every cell, padded and packed, forward and backward, on plans
that split K and take dG a gate at a time; each defect planted through the test-only
RNNFUSED_SIMULATE_DEFECT (a CTA barrier of program.h left out, ops.copy_rows reading with plain
loads, a grid barrier left out, the arrival at the grid barrier before the stores the other CTAs
read, a prefetch not waited for; in a cluster plan, pushes into a peer's operand tiles before it
zeroed them or into the tile it still multiplies, a wait for other than the bytes the peers push;
W held in registers for products other than the program's) is reported, forward and backward."""

import re
from pathlib import Path

import pytest
import torch

from rnnfused import _C
from conftest import flatten, max_error
from test_persistent import _cell_of, _exact, _module, _run, environment, simulation

CELLS = [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]
CELL_IDS = ["LSTM", "GRU", "GRU_CHO", "RNN_TANH", "RNN_RELU"]

# name -> (steps, batch, inputs, hidden, SMs, shared KB, planner), float64, bidirectional; the
# planner: None (the cost model), "spread" (stage 2's rule) or a forced ROWSxUNITS tiling. Each
# plan's features are asserted in _check_plan, so that a planner change cannot quietly take
# the tests off the paths they are meant to cover.
PLANS = {
    # 4 unit tiles x 2 row tiles; warps split K forward and backward; 16-byte row copies
    "split_k": (4, 20, 3, 64, 8, None, "spread"),
    # the backward's dG tile one gate at a time (LSTM, both GRU forms); 3 CTAs
    "chunked_dg": (4, 18, 3, 40, 3, 68, "spread"),
    # odd H: the element-by-element copy path; 3 units per CTA, 5 CTAs
    "element_copy": (3, 7, 2, 13, 5, None, "spread"),
    # one CTA per batch tile with every unit, 2 CTAs, no grid barrier: a CTA that touched
    # another's rows would be caught within the one interval between the kernel's ends
    "one_cta": (4, 20, 3, 64, 8, None, "16x64"),
    # the cost model's choice on an H100: neither one CTA per batch tile nor every SM
    "model": (4, 20, 3, 128, None, None, None),
    # two clusters of 4 CTAs (16-byte pushes), and one of 3 CTAs with slices that are not whole
    # 16-byte vectors (the last one a single unit: 2-byte elements push it with the padding
    # column H, in one 4-byte word)
    "cluster": (4, 20, 3, 64, None, None, "16x16"),
    "cluster_odd": (3, 7, 2, 13, None, None, "7x6"),
    # two clusters of 16 CTAs (sm_90's largest, not portable), 4 units each
    "cluster16": (4, 20, 3, 64, None, None, "16x4"),
}


def _limits(plan):
    """The RNNFUSED_* settings of a PLANS entry, for test_persistent.environment."""
    steps, batch, inputs, hidden, sms, smem_kb, planner = PLANS[plan]
    return simulation(sms, smem_kb, spread=planner == "spread", tiling=planner if planner != "spread" else None)


def _check_plan(name, mode, options):
    steps, batch, inputs, hidden, sms, smem_kb, planner = PLANS[name]
    with environment(**_limits(name)):
        plan = _C.layer_plan(_cell_of(mode, options), steps, hidden, batch, torch.float64, "cpu")
    assert plan["kernel"] == "persistent (host simulation)", plan["reason"]
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[mode]
    if name == "split_k":
        assert plan["split_fwd"] > 1 and plan["split_bwd"] > 1, plan
        assert plan["unit_tiles"] > 1 and plan["row_tiles"] > 1, plan
        assert hidden % 2 == 0  # whole 16-byte vectors of float64
    elif name == "chunked_dg":
        assert plan["ctas"] > 1
        assert plan["chunk_gates"] < gates or gates == 1, plan
    elif name == "one_cta":
        assert plan["unit_tiles"] == 1 and plan["row_tiles"] > 1, plan
    elif name == "model":
        assert 1 < plan["unit_tiles"] and plan["ctas"] < 132 // plan["row_tiles"] and "cost model" in plan["reason"]
    elif name.startswith("cluster"):
        assert plan["cluster"] == plan["unit_tiles"] > 1 and "distributed shared memory" in plan["reason"], plan
        assert plan["row_tiles"] == (1 if name == "cluster_odd" else 2), plan
        assert plan["cluster"] == {"cluster": 4, "cluster_odd": 3, "cluster16": 16}[name], plan
    else:
        assert hidden % 2 == 1 and plan["ctas"] > 1, plan
    return plan


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("mode,options", CELLS, ids=CELL_IDS)
def test_the_program_passes_the_checker(mode, options, plan, packed):
    """Forward and backward of both directions run through the checker (it raises on any
    hazard) and match the reference."""
    _check_plan(plan, mode, options)
    steps, batch, inputs, hidden, *_ = PLANS[plan]
    module = _module(mode, options, inputs, hidden, torch.float64, bidirectional=True)
    with environment(**_limits(plan)):
        simulated = _run(module, steps, batch, torch.float64, packed)
    assert max_error(simulated, _exact(module, steps, batch, packed)) <= 1e-10


def test_the_plans_cover_both_ways_the_backward_reads_its_inputs():
    """Prefetched into shared memory behind the barrier where they fit, from global memory in
    the pass otherwise (here chunked_dg's GRU forms and one_cta's LSTM)."""
    assert {_check_plan(name, mode, options)["prefetch_bwd"] for name in PLANS for mode, options in CELLS} == {
        True, False}


@pytest.mark.parametrize("plan", ["cluster", "cluster_odd", "cluster16"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,options", CELLS, ids=CELL_IDS)
def test_a_cluster_computes_what_the_grid_barrier_does(mode, options, dtype, plan):
    """A cluster plan's tiling with the grid barrier instead (RNNFUSED_PERSISTENT_CLUSTERS=0):
    the same products of the same operands (fp32 rounded to TF32 alike), so the same results
    bit for bit, packed and bidirectional; the checker runs on both (its byte count of every
    exchange included, the padded 2-byte pushes of cluster_odd too)."""
    steps, batch, inputs, hidden, *_ = PLANS[plan]
    module = _module(mode, options, inputs, hidden, dtype, bidirectional=True)
    results, unit_tiles = {}, set()
    for clusters in (None, 0):
        with environment(**_limits(plan), RNNFUSED_PERSISTENT_CLUSTERS=clusters):
            layer = _C.layer_plan(_cell_of(mode, options), steps, hidden, batch, dtype, "cpu")
            assert (layer["cluster"] > 0) == (clusters is None), layer["reason"]
            unit_tiles.add(layer["unit_tiles"])
            results[clusters] = _run(module, steps, batch, dtype, True)
    assert len(unit_tiles) == 1 and unit_tiles.pop() > 1
    assert all(torch.equal(a, b) for a, b in zip(results[None], results[0]))


@pytest.mark.parametrize("plan", ["cluster", "split_k"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mode,options", CELLS, ids=CELL_IDS)
def test_w_in_registers_computes_what_shared_memory_does(mode, options, dtype, plan):
    """The same plan with W read from shared memory by every product
    (RNNFUSED_PERSISTENT_HELD_W=0): the host simulation multiplies a held W from the copy its
    hold took, equal to the W each product would read since nothing writes W after begin, so
    the results agree bit for bit, packed and bidirectional; the checker sees the hold's reads
    of W and that every product of it has the hold's arguments. GRU_CHO holds nothing (its
    products take parts of W)."""
    steps, batch, inputs, hidden, *_ = PLANS[plan]
    module = _module(mode, options, inputs, hidden, dtype, bidirectional=True)
    results, held = {}, {}
    for setting in (None, 0):
        with environment(**_limits(plan), RNNFUSED_PERSISTENT_HELD_W=setting):
            layer = _C.layer_plan(_cell_of(mode, options), steps, hidden, batch, dtype, "cpu")
            held[setting] = (layer["held_fwd"], layer["held_bwd"])
            results[setting] = _run(module, steps, batch, dtype, True)
    assert held[0] == (0, 0)
    cho = mode == "GRU" and options.get("reset_after") is False
    assert (held[None] == (0, 0)) == cho, held
    assert all(torch.equal(a, b) for a, b in zip(results[None], results[0]))


# What the checker says of the hazards the defects below plant across CTAs.
CROSS_READ = ("global memory or a cluster's operand tile read by one CTA and written by another with no barrier "
              "ordering the two")
REUSED = "global buffer or operand tile reused before it was consumed: written by one CTA after another CTA read it"
TWO_WRITERS = "global memory or a cluster's operand tile written by two CTAs with no barrier ordering the two"
EXCHANGE = "a CTA of a cluster expects other than what its peers push into it in a phase"
HELD = "a product of a W tile held in registers (ops.hold) with other arguments than the hold's"
THREAD_RACE = ("global memory or an operand tile of a cluster plan touched by two threads of one CTA, one writing, "
               "with no CTA barrier between")

# (defect, cell, plan, the kernel it is planted in, what the checker must say)
DEFECTS = [
    ("skip_sync=operand", "LSTM", "split_k", "forward",
     "shared memory read after another thread wrote it with no CTA barrier between"),
    ("skip_sync=operand", "GRU", "split_k", "backward",
     "shared memory read after another thread wrote it with no CTA barrier between"),
    ("skip_sync=begin", "RNN_TANH", "element_copy", "forward", "shared memory written by two threads"),
    ("skip_sync=begin", "GRU_CHO", "chunked_dg", "forward", "shared memory written by two threads"),
    # The next dG chunk's product overwrites acc while the previous chunk's fold may still read
    # it (leaving out either barrier alone is no race: the other one orders the two).
    ("skip_sync=fold,skip_sync=operand", "LSTM", "chunked_dg", "backward",
     "shared memory reused before it was consumed: written after another thread read it"),
    ("plain_copy", "GRU", "split_k", "forward", "plain load of global memory another CTA wrote during the kernel"),
    ("plain_copy", "RNN_RELU", "element_copy", "backward",
     "plain load of global memory another CTA wrote during the kernel"),
    ("skip_barrier=0", "LSTM", "element_copy", "forward",
     CROSS_READ),
    ("skip_barrier=0", "GRU_CHO", "split_k", "backward",
     CROSS_READ),
    ("skip_barrier=1", "GRU_CHO", "split_k", "forward",
     REUSED),
    # h_t (forward) and dG (backward) stored after the arrival: ordered only before the phase
    # after next, so the next step's readers race with them.
    ("early_arrive", "LSTM", "element_copy", "forward",
     CROSS_READ),
    ("early_arrive", "GRU", "split_k", "backward",
     CROSS_READ),
    # The inputs prefetched for a step land while its cell pass reads them.
    ("skip_prefetch_wait", "LSTM", "split_k", "forward",
     "shared memory touched while a prefetch into it is in flight"),
    ("skip_prefetch_wait", "GRU_CHO", "element_copy", "forward",
     "shared memory reused before it was consumed: written after another thread read it"),
    ("skip_prefetch_wait", "GRU", "split_k", "backward", "shared memory touched while a prefetch into it is in flight"),
    # No input prefetch here (chunked_dg's GRU reads its inputs in the pass): the dG tile copied
    # in asynchronously (ops.copy_rows) is multiplied before it landed.
    ("skip_prefetch_wait", "GRU", "chunked_dg", "backward", "shared memory touched while a prefetch into it is in flight"),
    # GRU's staged W_hn h + b_hn (in a cluster, its backward's dgx of n), read from the inputs tile
    # as the next step's prefetch refills it.
    ("skip_sync=staged", "GRU", "split_k", "forward",
     "shared memory reused before it was consumed: written after another thread read it"),
    ("skip_sync=staged", "GRU", "cluster", "backward",
     "shared memory reused before it was consumed: written after another thread read it"),
    ("skip_sync=staged", "GRU_CHO", "cluster", "backward",
     "shared memory reused before it was consumed: written after another thread read it"),
    # The first step's prefetched inputs, copied in by chunk, read by element with nothing between.
    ("skip_sync=begin", "LSTM", "split_k", "backward",
     "shared memory read after another thread wrote it with no CTA barrier between"),
    # Clusters: a peer pushes into operand tiles its CTA has not zeroed yet; one operand tile
    # for every step, which peers overwrite while their CTA still multiplies it (both ways
    # round, whatever the order of the CTAs); the push reading the cell pass's h_t or dG with
    # no barrier between.
    ("skip_barrier=begin", "LSTM", "cluster", "forward",
     TWO_WRITERS),
    ("skip_barrier=begin", "GRU_CHO", "cluster_odd", "backward",
     TWO_WRITERS),
    ("one_buffer", "GRU", "cluster", "forward",
     REUSED),
    ("one_buffer", "RNN_TANH", "cluster_odd", "forward",
     CROSS_READ),
    ("one_buffer", "LSTM", "cluster", "backward",
     REUSED),
    ("skip_sync=phase_end", "GRU_CHO", "cluster", "forward",
     THREAD_RACE),
    ("skip_sync=phase_end", "LSTM", "cluster_odd", "backward",
     THREAD_RACE),
    # Every CTA expecting a word fewer than its peers push: on the GPU a wait that could return
    # before the last word landed.
    ("miscount", "GRU", "cluster", "forward", EXCHANGE),
    ("miscount", "RNN_RELU", "cluster_odd", "backward", EXCHANGE),
    # No wait after the exchange of the first phase: what the peers pushed is read unordered.
    ("skip_barrier=0", "LSTM", "cluster", "forward", CROSS_READ),
    # W held in registers for products split one way more than the program's: on the GPU the
    # warps' registers would hold other fragments than their jobs multiply.
    ("misheld", "LSTM", "cluster", "forward", HELD),
    ("misheld", "RNN_TANH", "split_k", "backward", HELD),
]


def _case(cell, plan):
    mode, options = CELLS[CELL_IDS.index(cell)]
    _check_plan(plan, mode, options)
    steps, batch, inputs, hidden, *_ = PLANS[plan]
    module = _module(mode, options, inputs, hidden, torch.float64)
    x = torch.randn(steps, batch, inputs, dtype=torch.float64, generator=torch.Generator().manual_seed(5),
                    requires_grad=True)
    return module, x, _limits(plan)


@pytest.mark.parametrize("defect,cell,plan,kernel,message", DEFECTS,
                         ids=[f"{d[0]}-{d[1]}-{d[3]}" for d in DEFECTS])
def test_the_checker_reports_a_planted_defect(defect, cell, plan, kernel, message):
    module, x, limits = _case(cell, plan)
    expected = rf"checker found \d+ kind\(s\) of hazard.*DEFECT={re.escape(defect)}\).*{re.escape(message)}"
    if kernel == "forward":
        with environment(**limits, RNNFUSED_SIMULATE_DEFECT=defect), \
                pytest.raises(RuntimeError, match=re.compile(expected, re.S)):
            module(x)
        return
    with environment(**limits):
        output = module(x)[0]
        with environment(RNNFUSED_SIMULATE_DEFECT=defect), pytest.raises(RuntimeError, match=re.compile(expected, re.S)):
            torch.autograd.grad(output.sum(), [x] + list(module.parameters()))


@pytest.mark.parametrize("defect,cell,plan", [("skip_sync=phase_end", "LSTM", "chunked_dg"),
                                              ("skip_sync=phase_end", "GRU_CHO", "split_k"),
                                              ("skip_sync=fold", "LSTM", "chunked_dg"),
                                              ("skip_sync=fold", "GRU", "chunked_dg")])
def test_a_redundant_barrier_left_out_is_not_a_defect(defect, cell, plan):
    """No false alarm. The CTA barrier at the end of a phase is followed on the GPU by the
    grid barrier, which starts with one of its own (but in a cluster plan, where the push
    between them reads what the phase wrote); the one after a dG chunk's fold is
    followed by the next chunk's copy and the barrier before its product: without either the
    program has no race, the checker says nothing, and the results stay the same."""
    module, x, limits = _case(cell, plan)
    with environment(**limits):
        expected = _run(module, x.shape[0], x.shape[1], torch.float64, False)
    with environment(**limits, RNNFUSED_SIMULATE_DEFECT=defect):
        actual = _run(module, x.shape[0], x.shape[1], torch.float64, False)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected))


def test_an_unknown_defect_is_an_error():
    module, x, limits = _case("RNN_TANH", "element_copy")
    with environment(**limits, RNNFUSED_SIMULATE_DEFECT="skip_sync=everything"), \
            pytest.raises((ValueError, RuntimeError), match="unknown defect 'skip_sync=everything'"):
        flatten(module(x))


def test_the_program_touches_memory_only_through_the_checked_accessors():
    """A raw subscript or dereference in program.h would be invisible to the checker: only the
    bodies of read, write and load_coherent dereference."""
    source = (Path(__file__).parent.parent / "csrc" / "persistent" / "program.h").read_text()
    raw = []
    for line in source.splitlines():
        code = line.split("//")[0]
        if re.search(r"[\w)\]]\s*\[", code) or re.search(r"\*[A-Za-z_(]", code):
            raw.append(code.strip())
    assert sorted(raw) == ["*p = value;", "return *p;", "return *p;"], raw
