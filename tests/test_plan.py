"""The planner and the memory simulator, on synthetic records and small programs."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from models import MODELS

import hetjax
from hetjax._fusion import FusedSources
from hetjax._memory import memory_timeline, plan_timeline
from hetjax._plan import make_plan
from hetjax._usage import ResidualUsage, Usage

matplotlib.use("Agg")
MB = 10**6
N = 40  # positions: 20 forward, 20 backward, 1 ms each
F = 20


def record(i: int, nbytes: int = 100 * MB, **kw) -> ResidualUsage:
    """Layer i's activation: made at i, used at i+1, needed again at N-1-i."""
    fields = dict(
        index=i, shape=(nbytes // 4,), dtype="float32", nbytes=nbytes, primitive="tanh",
        source="synthetic", produced_at=i, last_forward_use=i + 1,
        first_backward_use=N - 1 - i, last_backward_use=N - 1 - i, is_input=False,
        recomputable=False, offloadable=True,
    )  # fmt: skip
    fields.update(kw)
    return ResidualUsage(**fields)


def synthetic(records: list[ResidualUsage], args: int = 50 * MB) -> Usage:
    return Usage(
        program=None, residuals=tuple(records), recipes={}, eqns=(1e-3,) * N, boundary=F,
        buffers=((args, -1, N),),
    )  # fmt: skip


def layers(n: int = 10) -> Usage:
    return synthetic([record(i) for i in range(n)])


def test_memory_timeline_by_hand():
    # Arguments 50 live throughout; a residual of 100 from 2 to 5; another of 30 at 4.
    mem = memory_timeline(8, [(50, -1, 8), (100, 2, 5), (30, 4, 4)])
    assert mem.tolist() == [50, 50, 50, 150, 150, 180, 150, 50, 50, 50]


def test_plan_timeline_follows_decisions():
    usage = synthetic([record(0)], args=0)
    keep = plan_timeline(usage, [record(0, decision="keep")])
    assert keep.max() == 100 * MB and keep[1 + 0] == 100 * MB and keep[1 + N - 1] == 100 * MB
    moved = record(0, decision="offload", offload_by=3, prefetch_at=35)
    mem = plan_timeline(usage, [moved])
    on_device = [p for p in range(-1, N + 1) if mem[p + 1] > 0]
    assert on_device == [0, 1, 2, 3, 35, 36, 37, 38, 39]
    again = record(0, decision="recompute")
    assert plan_timeline(usage, [again])[1 + 10] == 0


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5])
def test_budget_is_met_when_feasible(fraction):
    usage = layers()
    baseline = make_plan(usage, "none").baseline_peak_bytes
    plan = make_plan(usage, "auto", device_budget=fraction * baseline, min_bytes=0)
    assert plan.feasible
    assert plan.predicted_peak_bytes <= fraction * baseline
    assert plan.baseline_peak_bytes == baseline


def test_smaller_budget_never_moves_fewer_bytes():
    usage = layers()
    baseline = make_plan(usage, "none").baseline_peak_bytes
    moved, previous = [], set()
    for fraction in np.linspace(1.0, 0.2, 9):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", hetjax.HetjaxWarning)
            plan = make_plan(usage, "auto", device_budget=fraction * baseline, min_bytes=0)
        # A warning exactly where the budget is not met; met down to half the baseline.
        assert bool(caught) == (not plan.feasible) and (plan.feasible or fraction < 0.5)
        now = {r.index for r in plan.offloaded}
        assert previous <= now
        previous = now
        moved.append(plan.moved_bytes)
    assert moved == sorted(moved) and moved[-1] > moved[0]


def test_infeasible_budget_says_so_once():
    usage = layers()
    with pytest.warns(hetjax.HetjaxWarning, match="cannot be met") as caught:
        plan = make_plan(usage, "auto", device_budget=60 * MB, min_bytes=0)
        make_plan(usage, "auto", device_budget=60 * MB, min_bytes=0)
    assert len(caught) == 1
    assert not plan.feasible and plan.moved_bytes > 0
    assert plan.predicted_peak_bytes < plan.baseline_peak_bytes


@pytest.mark.parametrize("budget", [None, 1.0])
@pytest.mark.parametrize("policy", ["all", "auto"])
def test_inputs_are_never_moved(policy, budget):
    records = [record(i, is_input=(i % 2 == 0)) for i in range(10)]
    with pytest.warns(hetjax.HetjaxWarning) if budget else _no_warning():
        plan = make_plan(synthetic(records), policy, device_budget=budget, min_bytes=0)
    assert all(r.decision != "offload" for r in plan.residuals if r.is_input)
    assert any(r.decision == "offload" for r in plan.residuals)


def test_cheap_residuals_are_recomputed_not_moved():
    records = [record(i, recomputable=(i < 3)) for i in range(6)]
    plan = make_plan(synthetic(records), "all", min_bytes=0)
    assert [r.decision for r in plan.residuals] == ["recompute"] * 3 + ["offload"] * 3


def test_plan_is_deterministic():
    usage = layers()
    a = make_plan(usage, "auto", device_budget=600 * MB, min_bytes=0)
    b = make_plan(usage, "auto", device_budget=600 * MB, min_bytes=0)
    assert a.residuals == b.residuals
    np.testing.assert_array_equal(a.predicted_memory, b.predicted_memory)


def test_no_budget_mode_moves_only_what_hides():
    usage = layers()
    plan = make_plan(usage, "auto", min_bytes=0)
    assert plan.exposed_transfer_s <= 0.01 * plan.timeline[-1]
    everything = make_plan(usage, "all", min_bytes=0)
    assert everything.exposed_transfer_s > plan.exposed_transfer_s


def test_pins_lie_between_use_points():
    plan = make_plan(layers(), "all", min_bytes=0)
    for r in plan.offloaded:
        assert r.last_forward_use < r.offload_by <= F
        assert F <= r.prefetch_at <= r.first_backward_use


def test_a_move_with_no_window_is_kept():
    # Made two positions before the backward and needed one after it: its copy to host
    # cannot be done before its copy back must start, so moving it frees nothing.
    late = record(18, first_backward_use=21, last_backward_use=21)
    plan = make_plan(synthetic([record(0), late]), "all", min_bytes=0)
    assert [r.decision for r in plan.residuals] == ["offload", "keep"]
    assert plan.residuals[1].offload_by is None and plan.moved_bytes == 100 * MB
    # Its link time is not counted either: the one move left hides.
    assert plan.exposed_transfer_s == 0.0


def _positions_ok(report: hetjax.Report) -> None:
    assert report.residuals
    for r in report.residuals:
        assert r.produced_at <= r.last_forward_use <= r.first_backward_use, r
        assert r.first_backward_use <= r.last_backward_use, r
        if r.decision == "offload":
            assert r.prefetch_at <= r.first_backward_use, r
            assert r.produced_at < r.offload_by <= r.prefetch_at, r


def test_a_residual_xla_rebuilds_costs_its_source_and_moves_only_where_that_helps():
    # Residual 0 is f32 work XLA rebuilds in the backward from a 50 MB stored value made
    # at 0 and last read at 1; residual 1 is stored as JAX names it.
    source = FusedSources(values=((0, (50 * MB, 0, 1)),), residuals=())
    usage = dataclasses.replace(synthetic([record(0), record(1)]), fused={0: source})
    baseline = make_plan(usage, "none").baseline_memory
    assert baseline.max() == 50 * MB + 50 * MB + 100 * MB  # arguments, source, residual 1
    plan = make_plan(usage, "all", min_bytes=0)
    # Moved, residual 0 would be stored whole (100 MB) until its copy is done.
    assert [r.decision for r in plan.residuals] == ["keep", "offload"]
    both = make_plan(usage, "all", min_bytes=0, choices={0: "offload", 1: "offload"})
    assert plan.predicted_peak_bytes <= plan.baseline_peak_bytes < both.predicted_peak_bytes


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("policy", ["all", "auto"])
def test_the_model_never_predicts_a_plan_above_plain(model, policy):
    loss, args = MODELS[model]()
    report = hetjax.analyze(loss, *args, policy=policy, min_bytes=0)
    assert report.predicted_peak_bytes <= report.baseline_peak_bytes


@pytest.mark.parametrize("model", ["stacked_mlp", "scan", "attention"])
def test_analyze_positions_are_consistent(model):
    loss, args = MODELS[model]()
    report = hetjax.analyze(loss, *args, policy="all", min_bytes=0)
    _positions_ok(report)
    assert report.moved_bytes > 0
    assert report.predicted_peak_bytes <= report.baseline_peak_bytes


def test_analyze_accepts_shapes_and_het_offload_uses_the_same_plan():
    loss, _ = MODELS["stacked_mlp"]()
    # Shapes only: analyze and make_jaxpr need no arrays.
    shapes = [
        jax.ShapeDtypeStruct((8, 256, 256), "float32"),
        jax.ShapeDtypeStruct((1024, 256), "float32"),
    ]
    # Below what the model can reach (0.59 of its peak): it recomputes.
    budget = 0.45 * hetjax.analyze(loss, *shapes, policy="none").baseline_peak_bytes
    with pytest.warns(hetjax.HetjaxWarning, match="cannot be met"):
        report = hetjax.analyze(loss, *shapes, policy="auto", device_budget=budget, min_bytes=0)
    assert not report.feasible and report.plan.recompute_s > 0
    everything = hetjax.analyze(loss, *shapes, policy="all", min_bytes=0)
    assert everything.moved_bytes > 0
    for options, planned in [(dict(policy="auto", device_budget=budget), report),
                             (dict(policy="all"), everything)]:  # fmt: skip
        decorated = hetjax.het_offload(loss, min_bytes=0, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hetjax.HetjaxWarning)
            jaxpr = str(jax.make_jaxpr(jax.grad(decorated))(*shapes))
        assert jaxpr.count("devices=(MemorySpace.Host,)") == len(planned.plan.offloaded)


def test_table_and_plot_headless():
    loss, args = MODELS["stacked_mlp"]()
    report = hetjax.analyze(loss, *args, policy="all", min_bytes=0)
    table = report.table()
    assert "offload" in table and "test_plan" not in table  # source lines are the model's
    assert "models.py" in table and "predicted peak" in table
    fig = report.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and fig.axes[0].lines
    matplotlib.pyplot.close(fig)


def test_measure_device_on_cpu_says_kinds_do_nothing():
    profile = hetjax.measure_device()
    assert isinstance(profile, hetjax.DeviceProfile)
    if jax.default_backend() == "cpu":
        assert not profile.memory_kinds_work and "cpu" in profile.name


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_replace_keeps_frozen_records():
    r = record(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.decision = "offload"  # type: ignore[misc]
    assert jnp.asarray(r.nbytes) == 100 * MB


def test_equation_times_count_matmul_and_conv_flops():
    from hetjax._cost import DeviceProfile, _conv_flops, _dot_flops, eqn_seconds

    profile = DeviceProfile.for_platform("gpu")
    m, k, n = 8192, 4096, 2048  # shapes only: nothing is allocated
    a, b = jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    dot = jax.make_jaxpr(jnp.matmul)(a, b).eqns[0]
    assert _dot_flops(dot) == 2 * m * k * n
    # Big enough to be compute-bound on the default (H200) profile.
    assert eqn_seconds(dot, profile) == pytest.approx(2 * m * k * n / profile.matmul_flops_per_s)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

    x, w = jax.ShapeDtypeStruct((8, 32, 32, 64), jnp.float32), jnp.ones((3, 3, 64, 128))
    eqn = jax.make_jaxpr(conv)(x, w).eqns[0]
    assert _conv_flops(eqn) == 2 * (8 * 32 * 32 * 128) * (3 * 3 * 64)  # one 3x3x64 filter


def test_per_iteration_residual_pins_memory_and_exposure():
    """A stack of 10 slices made by the scan at position 2 and read by the one at
    N - 3: pinned to those scans, on device one slice and the one in flight at a
    time, and its copies overlap the scans' own compute (1 ms each here)."""
    stack = record(2, nbytes=100 * MB, shape=(10, 25 * MB // 10), produced_at=2,
                   last_forward_use=2, first_backward_use=N - 3, last_backward_use=N - 3,
                   per_iteration=True)  # fmt: skip
    usage = synthetic([stack], args=0)
    plan = make_plan(usage, "all", min_bytes=0)
    (r,) = plan.offloaded
    assert (r.move, r.offload_by, r.prefetch_at) == ("per-iteration", 3, N - 3)
    two_slices = 2 * 10 * MB
    on_device = {p: int(plan.predicted_memory[p + 1]) for p in range(-1, N + 1)}
    assert {p for p, b in on_device.items() if b} == {2, N - 3}
    assert max(on_device.values()) == two_slices
    profile = plan.profile
    # The copy out starts with the forward scan and is due by its end; the copy back
    # starts with the backward scan and is due by its end: 1 ms of cover each way.
    expected = max(0.0, profile.d2h_seconds(100 * MB) - 1e-3)
    expected += max(0.0, profile.h2d_seconds(100 * MB) - 1e-3)
    assert plan.exposed_transfer_s == pytest.approx(expected)
    whole = make_plan(synthetic([dataclasses.replace(stack, per_iteration=False)], args=0),
                      "all", min_bytes=0)  # fmt: skip
    assert whole.predicted_peak_bytes == 100 * MB > plan.predicted_peak_bytes


def test_calibration_keeps_matmul_time_and_scales_the_rest():
    from hetjax._cost import (
        MIN_FUSION_SCALE,
        DeviceProfile,
        calibrated,
        eqn_seconds,
        jaxpr_seconds,
    )

    profile = DeviceProfile.for_platform("gpu")
    a = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    eqns = jax.make_jaxpr(lambda a, b: jnp.tanh(a @ b) * 2)(a, a).eqns
    (dot,) = [e for e in eqns if e.primitive.name == "dot_general"]
    matmul, total = eqn_seconds(dot, profile), jaxpr_seconds(eqns, profile)
    # Compiled, the elementwise work takes a quarter of the model's time (fused).
    fused = calibrated(profile, eqns, matmul + (total - matmul) / 4)
    assert fused.fusion_scale == pytest.approx(0.25)
    assert eqn_seconds(dot, fused) == matmul
    assert jaxpr_seconds(eqns, fused) == pytest.approx(matmul + (total - matmul) / 4)
    # Faster than the model's matmuls alone: the rest keeps a floor.
    assert calibrated(profile, eqns, matmul / 2).fusion_scale == MIN_FUSION_SCALE


def test_a_budget_moves_a_matmul_chains_value_where_the_link_hides_it():
    """The budget order moves a residual whose chain runs a matmul where its copies hide
    under compute (the planner's queue model), though they take longer than the chain:
    the link time is free then, the flops are not. Where the copies would not hide, it
    rebuilds the residual."""
    from hetjax._api import usage_and_plan
    from hetjax._cost import DeviceProfile
    from hetjax._plan import budget_order, chain_seconds

    loss, args = MODELS["attention"]()
    options = dict(policy="none", min_bytes=0, device_budget=None, profile=None, target=None)
    usage = usage_and_plan(loss, args, {}, options)[0]
    (exp,) = [r for r in usage.residuals if r.primitive == "exp"]
    profile = DeviceProfile.for_platform("gpu")
    link_s = profile.d2h_seconds(exp.nbytes) + profile.h2d_seconds(exp.nbytes)
    assert chain_seconds(usage, exp.index, profile) < link_s
    assert dict(budget_order(usage, 0))[exp.index] == "offload"
    slow = dataclasses.replace(profile, d2h_bytes_per_s=1e3, h2d_bytes_per_s=1e3)
    assert dict(budget_order(usage, 0, slow))[exp.index] == "recompute"


GPT_CONFIG = {"layers": 3, "dim": 128, "heads": 4, "seq": 256, "batch": 4, "vocab": 256}


def _three_layer_gpt(monkeypatch: pytest.MonkeyPatch, name: str = "gpt") -> Usage:
    """The record of a three-layer version of the benchmarks' gpt (`GPT_CONFIG`), or
    with `name="gpt_scan"` of the same layers run by a scan."""
    import importlib.util
    from pathlib import Path

    from hetjax._api import usage_and_plan

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "models.py"
    spec = importlib.util.spec_from_file_location("benchmark_models", path)
    models = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, models)  # its dataclasses look it up
    spec.loader.exec_module(models)
    models.GPT_PRESETS["three_layers"] = GPT_CONFIG
    model = models.MODELS[name]("three_layers")
    options = dict(policy="none", min_bytes=0, device_budget=None, profile=None, target=None)
    return usage_and_plan(model.loss, jax.eval_shape(model.init), {}, options)[0]


def test_the_every_chain_candidate_rebuilds_layers_whole_and_only_what_frees_the_peak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`chains_and_moves` rebuilds the greedy order's residuals one chain deeper than the
    order may (a layer's attention output, from its probabilities and v), then any other
    that frees its bytes at the modelled peak: not the logits' `exp`, needed there."""
    from hetjax._plan import (
        LAYER_CHAIN_DEPTH,
        MAX_CHAIN_DEPTH,
        _chain_allowed,
        _choices,
        budget_order,
        chains_and_moves,
    )

    usage = _three_layer_gpt(monkeypatch)

    order = dict(budget_order(usage, 0))
    rebuilt, moved = chains_and_moves(usage, list(order.items()), 0)
    evaluate = _choices(usage, "auto", 0, None)[3]
    peak = evaluate(rebuilt)[1].max()
    beyond = [k for k in rebuilt if k not in order]
    assert beyond
    for k in beyond:  # each frees at least half its bytes at the peak
        without = {j: d for j, d in rebuilt.items() if j != k}
        assert evaluate(without)[1].max() - peak >= usage.residuals[k].nbytes / 2
    # Some rebuilt value rests on three chains with a matmul, which the order never takes.
    some = next(iter(rebuilt))
    assert _chain_allowed(usage, some, rebuilt, max_depth=LAYER_CHAIN_DEPTH)
    assert not _chain_allowed(usage, some, rebuilt, max_depth=MAX_CHAIN_DEPTH)
    logits_exp = [r for r in usage.residuals if r.primitive == "exp"][-1]
    assert logits_exp.shape[-1] == GPT_CONFIG["vocab"]
    assert _chain_allowed(usage, logits_exp.index, rebuilt, max_depth=LAYER_CHAIN_DEPTH)
    assert logits_exp.index not in rebuilt
    assert set(moved) <= set(rebuilt)


def test_moves_are_grouped_by_their_line_of_code_costliest_chain_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`move_groups` splits the moves that replace chains into one group per line of code,
    which in a stack of layers is one value of every layer, the costliest chain first:
    the compile check tries them a group at a time."""
    from hetjax._cost import DeviceProfile
    from hetjax._plan import chain_seconds, matmul_in, move_groups

    usage = _three_layer_gpt(monkeypatch)
    moves = {k: "offload" for k in usage.chains if matmul_in(usage, k)}
    groups = move_groups(usage, moves)
    assert {k: d for g in groups for k, d in g.items()} == moves
    assert sum(map(len, groups)) == len(moves)
    source = {r.index: r.source for r in usage.residuals}
    assert all(len({source[k] for k in g}) == 1 for g in groups)
    assert len({source[next(iter(g))] for g in groups}) == len(groups)
    assert any(len(g) == GPT_CONFIG["layers"] for g in groups)  # a layer's value, per layer
    profile = DeviceProfile.for_platform("gpu")
    costliest = [max(chain_seconds(usage, k, profile) for k in g) for g in groups]
    assert costliest == sorted(costliest, reverse=True)
    assert len(groups) > 1


def test_a_scans_layer_is_rebuilt_whole_however_deep_its_chains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a scan a layer's values rest on slices of their own iteration, so the
    every-chain candidate rebuilds each of them that runs a matmul from the layer's
    stacked input, as per-layer remat does, though what follows the attention output
    rests on more than `LAYER_CHAIN_DEPTH` chains with a matmul, which an unrolled
    layer's values may not."""
    from hetjax._plan import (
        LAYER_CHAIN_DEPTH,
        budget_order,
        chain_depths,
        chains_and_moves,
        matmul_in,
    )

    usage = _three_layer_gpt(monkeypatch, "gpt_scan")
    rebuilt, moved = chains_and_moves(usage, budget_order(usage, 0), 0)
    looped = {r.index for r in usage.residuals if r.per_iteration}
    with_matmul = {k for k in usage.chains if matmul_in(usage, k)} & looped
    assert with_matmul and with_matmul <= set(rebuilt)
    assert not moved  # copies into a host stack do not hide (`_plan._worth_moving`)
    assert max(chain_depths(usage, rebuilt).values()) > LAYER_CHAIN_DEPTH
    unrolled = _three_layer_gpt(monkeypatch)
    rebuilt, _ = chains_and_moves(unrolled, budget_order(unrolled, 0), 0)
    assert max(chain_depths(unrolled, rebuilt).values()) == LAYER_CHAIN_DEPTH


def test_anchor_groups_move_what_the_chains_start_from_a_line_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`anchor_groups` names the values the every-chain candidate keeps and rebuilds from
    (a layer's stream between its sublayers), one group per line of code, most bytes
    first; moving a group keeps every chain (no flops added) and lowers the modelled
    peak. Under a scan, whose chains start from slices of stacks, there are none."""
    from hetjax._plan import (
        _choices,
        anchor_groups,
        budget_order,
        chains_and_moves,
        make_plan,
    )

    usage = _three_layer_gpt(monkeypatch)
    chains, _ = chains_and_moves(usage, budget_order(usage, 0), 0)
    plan = make_plan(usage, "auto", min_bytes=0, choices=chains, speed_first=False)
    groups = anchor_groups(usage, plan.residuals, 0)
    assert groups
    record = {r.index: r for r in plan.residuals}
    starts = {a for k in chains for a in usage.recipe_of(k).residual_anchors}
    for group in groups:
        assert set(group.values()) == {"offload"} and set(group) <= starts
        assert len({record[k].source for k in group}) == 1
        assert all(record[k].decision == "keep" and record[k].offloadable for k in group)
    sizes = [sum(record[k].nbytes for k in g) for g in groups]
    assert sizes == sorted(sizes, reverse=True)
    assert len(groups[0]) > 1  # one value of several layers
    evaluate = _choices(usage, "auto", 0, None)[3]
    records, memory, _ = evaluate({**chains, **groups[0]})
    kept = evaluate(chains)[1]
    assert (memory <= kept).all() and (memory < kept).any()
    assert {r.index for r in records if r.decision == "recompute"} >= set(chains)
    assert {r.index for r in records if r.decision == "offload"} == set(groups[0])
    # Bytes under min_bytes stay.
    assert anchor_groups(usage, plan.residuals, 2 * max(sizes)) == []

    looped = _three_layer_gpt(monkeypatch, "gpt_scan")
    chains, _ = chains_and_moves(looped, budget_order(looped, 0), 0)
    plan = make_plan(looped, "auto", min_bytes=0, choices=chains, speed_first=False)
    starts = [k for g in anchor_groups(looped, plan.residuals, 0) for k in g]
    assert not any(looped.residuals[k].per_iteration for k in starts)


@pytest.mark.parametrize("misses", [True, False])
def test_a_budget_every_chain_misses_moves_what_the_chains_start_from(
    monkeypatch: pytest.MonkeyPatch, misses: bool
) -> None:
    """The compile check's search (`_check.checked_plan`), with a stand-in compiler that
    answers with the memory model's peak and a step time of the plan's recomputation:
    where every chain rebuilt misses the budget, it compiles that plan with the values
    its chains start from moved (`anchor_groups`) and meets the budget; where every
    chain meets it, it compiles no such plan."""
    from hetjax import _check
    from hetjax._compile import CompiledMemory
    from hetjax._plan import _choices, anchor_groups, budget_order, chains_and_moves, make_plan
    from hetjax._simulate import StepEstimate

    usage = _three_layer_gpt(monkeypatch)
    plain_peak = make_plan(usage, "none", min_bytes=0).baseline_peak_bytes
    compiled: list = []

    def stand_in(plan: Any, target: Any, avals: Any, kwargs: Any) -> tuple:
        peak = plain_peak if plan is None else plan.predicted_peak_bytes
        ms = 10.0 if plan is None else 10.0 + 1e3 * plan.recompute_s
        compiled.append(plan)
        memory = CompiledMemory("h200", "stand-in", jax.__version__, peak, 0, 0, 0, 0)
        return memory, StepEstimate("h200", ms, ms, 0, 0, 0, 0, 1)

    monkeypatch.setattr(_check, "gradient_program", lambda primal, usage, plan: plan)
    monkeypatch.setattr(_check, "_compiled", stand_in)
    monkeypatch.setattr(_check, "_compiles", {})  # no plan compiled before
    evaluate = _choices(usage, "auto", 0, None)[3]
    chains = chains_and_moves(usage, budget_order(usage, 0), 0)[0]
    every_chain = make_plan(usage, "auto", min_bytes=0, choices=chains, speed_first=False)
    groups = anchor_groups(usage, every_chain.residuals, 0)[: _check.ANCHOR_GROUPS]
    lowest = min(evaluate({**chains, **dict(p for g in groups[:n] for p in g.items())})[1].max()
                 for n in range(1, len(groups) + 1))  # fmt: skip
    assert lowest < every_chain.predicted_peak_bytes
    budget = lowest if misses else every_chain.predicted_peak_bytes
    options = dict(policy="auto", device_budget=budget, min_bytes=0, profile=None, target="h200")
    plan = _check.checked_plan(f"stand-in {misses}", [], usage, options)

    starts = {k for g in groups for k in g}

    def moves_starts(p: Any) -> bool:
        decision = {r.index: r.decision for r in p.residuals}
        moved = {k for k, d in decision.items() if d == "offload"}
        return all(decision[k] == "recompute" for k in chains) and moved and moved <= starts

    assert plan.compiled_peak_bytes <= budget
    assert any(p is not None and moves_starts(p) for p in compiled) == misses


def test_a_value_moved_in_pieces_has_each_piece_due_in_turn():
    # Layer 0's activation, moved in 4 pieces: each piece's copy back is done
    # PIECE_STAGGER link times of a piece before the next's, the last by the first use.
    from hetjax._plan import PIECE_STAGGER, piece_arrivals

    usage = synthetic([record(0)])
    plan = make_plan(usage, "all", min_bytes=0, pieces={0: 4})
    (r,) = plan.offloaded
    assert r.pieces == 4 and r.move == "in 4 pieces"
    assert make_plan(usage, "all", min_bytes=0, pieces={0: 1}).offloaded[0].move == "whole"
    assert set(piece_arrivals(plan)) == {0}
    clock = np.asarray(plan.timeline)
    step = PIECE_STAGGER * plan.profile.h2d_seconds(r.nbytes // 4)
    due = piece_arrivals(plan)[0]
    assert [p for p, _ in due] == [0, 1, 2]
    for p, at in due:
        assert r.prefetch_at < at < r.first_backward_use
        assert clock[at] <= clock[r.first_backward_use] - (3 - p) * step < clock[at + 1]
    # Pieces of a value the plan keeps change nothing.
    kept = make_plan(usage, "none", min_bytes=0, pieces={0: 4})
    assert {x.pieces for x in kept.residuals} == {1} and not piece_arrivals(kept)


@pytest.mark.parametrize(
    "pieces, message",
    [
        ({7: 2}, "7 is not the index of a residual"),
        ({0: 0}, "0 for residual 0 is not a positive int"),
        ({0: 2.0}, "2.0 for residual 0 is not a positive int"),
        ({0: 3}, r"residual 0 \(float32\[25000000\], synthetic\) does not split into 3"),
        ({1: 2}, "residual 1 .* moves one scan slice at a time"),
    ],
)
def test_bad_pieces_are_named(pieces, message):
    usage = synthetic([record(0), record(1, per_iteration=True)])
    with pytest.raises(ValueError, match=message):
        make_plan(usage, "all", min_bytes=0, pieces=pieces)
