"""The weight-offload placement policy (torch-free): budgets are kept, the smallest
budget named in the error really is the smallest that works, resident layers are
spaced evenly, and the MLP goes to host memory before the attention projections."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtensor.models.offload.policy import (
    BudgetTooSmallError,
    LayerWeights,
    OffloadRequest,
    WeightPlacement,
    balanced_offloaded,
    plan_placement,
)

MiB, GiB = 1 << 20, 1 << 30


def llama(layers: int, hidden: int, q_heads: int, kv_heads: int, inter: int) -> list[LayerWeights]:
    d = 128
    attn = (hidden * (q_heads + 2 * kv_heads) * d + hidden * q_heads * d) * 2
    mlp = 3 * hidden * inter * 2
    return [LayerWeights(i, {"attn": attn, "mlp": mlp}) for i in range(layers)]


LLAMA3_8B = llama(32, 4096, 32, 8, 14336)
LLAMA3_70B = llama(80, 8192, 64, 8, 28672)
FIXED_8B = 2 * 128256 * 4096 * 2
FIXED_70B = 2 * 128256 * 8192 * 2


def total(layers: list[LayerWeights]) -> int:
    return sum(sum(w.groups.values()) for w in layers)


def circular_gaps(positions: list[int], n: int) -> list[int]:
    return [(positions[(i + 1) % len(positions)] - p) % n or n for i, p in enumerate(positions)]


def check_plan(p: WeightPlacement, layers: list[LayerWeights], req: OffloadRequest) -> None:
    """What every placement must satisfy."""
    assert p.offloaded_bytes + p.resident_layer_bytes == total(layers)
    for w, lp in zip(layers, p.layers):
        assert set(lp.offloaded) <= set(w.groups) and lp.layer == w.layer
        assert lp.offloaded_bytes == sum(w.groups[g] for g in lp.offloaded)
    m = len(p.order)
    assert p.ring_depth == min(req.ring_depth, m)
    if m:
        assert p.slot_bytes % req.slot_granularity == 0
        assert p.slot_bytes >= max(lp.offloaded_bytes for lp in p.layers)
        assert [p.layers[layer].slot for layer in p.order] == [k % p.ring_depth for k in range(m)]
    else:
        assert p.ring_bytes == 0


# ------------------------------------------------------------------ balanced locking
@given(n=st.integers(1, 200), data=st.data())
def test_resident_layers_are_spaced_evenly(n: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(0, n))
    off = balanced_offloaded(n, count)
    assert len(off) == count == len(set(off)) and off == sorted(off)
    resident = sorted(set(range(n)) - set(off))
    if len(resident) >= 2:
        gaps = circular_gaps(resident, n)
        assert max(gaps) - min(gaps) <= 1, (resident, gaps)
        assert min(gaps) == n // len(resident)
    # Not the first N: no run of offloaded layers longer than it must be.
    if resident:
        longest = max(circular_gaps(resident, n)) - 1 if len(resident) > 1 else n - 1
        assert longest <= -(-count // len(resident))


def test_balanced_offloaded_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="cannot offload 5 of 4"):
        balanced_offloaded(4, 5)


def test_llama3_8b_at_half_budget_keeps_evenly_spaced_layers_and_attention() -> None:
    """Half the weights: every offloaded unit is an MLP (tensor preservation), and the
    layers that keep theirs are spread over the model (balanced locking)."""
    half = (FIXED_8B + total(LLAMA3_8B)) // 2
    req = OffloadRequest(gpu_memory_budget=half, slot_granularity=2 * MiB)
    p = plan_placement(LLAMA3_8B, FIXED_8B, 0, req)
    check_plan(p, LLAMA3_8B, req)
    assert p.gpu_bytes <= req.gpu_memory_budget
    assert {g for lp in p.layers for g in lp.offloaded} == {"mlp"}
    resident = [lp.layer for lp in p.layers if not lp.offloaded]
    assert len(resident) >= 4 and resident != list(range(len(resident)))
    gaps = circular_gaps(resident, 32)
    assert max(gaps) - min(gaps) <= 1
    assert p.slot_bytes == LLAMA3_8B[0].groups["mlp"]  # the ring holds MLPs only
    assert "M" in p.layer_map() and "." in p.layer_map() and "A" not in p.layer_map()
    assert "mlp x" in p.describe() and "gpu_memory_budget" in p.describe()


def test_attention_goes_to_host_only_after_every_mlp() -> None:
    """A budget below "all MLPs offloaded" must offload attention projections too; the
    MLPs go first, so no layer offloads its attention while keeping its MLP."""
    all_mlp = total(LLAMA3_70B) - sum(w.groups["mlp"] for w in LLAMA3_70B)
    req = OffloadRequest(gpu_memory_budget=FIXED_70B + all_mlp // 2, slot_granularity=2 * MiB)
    p = plan_placement(LLAMA3_70B, FIXED_70B, 0, req)
    check_plan(p, LLAMA3_70B, req)
    assert any("attn" in lp.offloaded for lp in p.layers)
    assert all("mlp" in lp.offloaded for lp in p.layers if "attn" in lp.offloaded)


# ------------------------------------------------------------------------ budgets
def layer_sets() -> st.SearchStrategy[list[LayerWeights]]:
    sizes = st.integers(1, 5000)
    homogeneous = st.builds(
        lambda n, a, m: [LayerWeights(i, {"attn": a, "mlp": m}) for i in range(n)],
        st.integers(1, 24), sizes, sizes,
    )  # fmt: skip
    mixed = st.lists(
        st.dictionaries(st.sampled_from(["attn", "mlp", "x"]), sizes, min_size=1), min_size=1,
        max_size=12,
    ).map(lambda gs: [LayerWeights(i, g) for i, g in enumerate(gs)])  # fmt: skip
    return st.one_of(homogeneous, mixed)


@settings(max_examples=300, deadline=None)
@given(
    layers=layer_sets(),
    fixed=st.integers(0, 3000),
    workspace=st.integers(0, 3000),
    depth=st.integers(2, 4),
    gran=st.sampled_from([1, 64, 1000]),
    frac=st.floats(0.0, 1.3),
)
def test_a_budget_is_kept_or_refused_with_the_smallest_that_works(
    layers: list[LayerWeights], fixed: int, workspace: int, depth: int, gran: int, frac: float
) -> None:
    budget = max(1, int(frac * (fixed + workspace + total(layers))))
    req = OffloadRequest(gpu_memory_budget=budget, ring_depth=depth, slot_granularity=gran)
    try:
        p = plan_placement(layers, fixed, workspace, req)
    except BudgetTooSmallError as exc:
        smallest = exc.smallest_budget
        assert smallest > budget and f"smallest budget that works is {smallest} bytes" in str(exc)
        ok = OffloadRequest(gpu_memory_budget=smallest, ring_depth=depth, slot_granularity=gran)
        p = plan_placement(layers, fixed, workspace, ok)
        check_plan(p, layers, ok)
        assert p.gpu_bytes <= smallest
        if smallest > 1:  # and one byte less does not
            less = OffloadRequest(smallest - 1, ring_depth=depth, slot_granularity=gran)
            with pytest.raises(BudgetTooSmallError):
                plan_placement(layers, fixed, workspace, less)
        return
    check_plan(p, layers, req)
    assert p.gpu_bytes <= budget
    if fixed + workspace + total(layers) <= budget:
        assert not p.order  # no offload when everything fits
    else:
        assert len(p.order) > p.ring_depth  # a ring never holds every offloaded layer


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(3, 40),
    attn=st.integers(1, 5000),
    mlp=st.integers(1, 5000),
    depth=st.integers(2, 3),
    frac=st.floats(0.05, 0.99),
)
def test_a_homogeneous_budget_leaves_less_than_a_layer_unused(
    n: int, attn: int, mlp: int, depth: int, frac: float
) -> None:
    layers = [LayerWeights(i, {"attn": attn, "mlp": mlp}) for i in range(n)]
    budget = max(1, int(frac * total(layers)))
    req = OffloadRequest(gpu_memory_budget=budget, ring_depth=depth)
    try:
        p = plan_placement(layers, 0, 0, req)
    except BudgetTooSmallError:
        return
    assert budget - p.gpu_bytes < attn + mlp


@settings(max_examples=200, deadline=None)
@given(layers=layer_sets(), fixed=st.integers(0, 3000), depth=st.integers(2, 4),
       frac=st.floats(0.0, 1.2))  # fmt: skip
def test_cpu_offload_saves_what_was_asked_net_of_the_ring(
    layers: list[LayerWeights], fixed: int, depth: int, frac: float
) -> None:
    ask = int(frac * total(layers))
    req = OffloadRequest(cpu_offload_bytes=ask, ring_depth=depth)
    try:
        p = plan_placement(layers, fixed, 123, req)
    except BudgetTooSmallError:
        raise AssertionError("cpu_offload_gb is not a budget") from None
    except ValueError as exc:
        assert "cannot be met" in str(exc) and "at most" in str(exc)
        return
    check_plan(p, layers, req)
    assert fixed + total(layers) - p.weights_gpu_bytes >= ask
    assert p.workspace_bytes == 123


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        OffloadRequest(gpu_memory_budget=10, cpu_offload_bytes=5)
    with pytest.raises(ValueError, match="at least 2 layers deep"):
        OffloadRequest(gpu_memory_budget=10, ring_depth=1)
    with pytest.raises(ValueError, match="positive"):
        OffloadRequest(gpu_memory_budget=0)
    with pytest.raises(ValueError, match="numbered"):
        plan_placement([LayerWeights(1, {"mlp": 1})], 0, 0, OffloadRequest(cpu_offload_bytes=1))


def test_no_request_or_a_large_budget_offloads_nothing() -> None:
    for req in (OffloadRequest(), OffloadRequest(gpu_memory_budget=100 * GiB)):
        p = plan_placement(LLAMA3_8B, FIXED_8B, GiB, req)
        assert not p.order and p.ring_bytes == 0 and "none needed" in p.describe()


def test_a_model_too_shallow_for_a_ring_must_fit_whole() -> None:
    """Two layers and a 2-deep ring: offloading cannot save anything, so the smallest
    budget is the whole model."""
    layers = [LayerWeights(i, {"attn": 100, "mlp": 300}) for i in range(2)]
    with pytest.raises(BudgetTooSmallError) as err:
        plan_placement(layers, 50, 10, OffloadRequest(gpu_memory_budget=500))
    assert err.value.smallest_budget == 50 + 10 + 800


def test_the_policy_imports_no_torch() -> None:
    modules = "vtensor.models.offload.policy, vtensor.models.offload.placement"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
