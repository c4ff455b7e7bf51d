"""The mixed INT4/INT8 bit-allocation MILP on hand-made cost tables: the optimum against
brute force, tied layers, fixed (overridden) layers, activation widths chosen per tensor,
budget parsing and infeasible budgets."""

import itertools

import numpy as np
import pytest
from tvmq.passes.bit_allocation import (
    ActivationGroup,
    Budget,
    BudgetKind,
    LayerCost,
    allocate_bits,
)

from tvmq.errors import ConfigError


def _layer(name, sens4, bytes8, *, lat=None, bops8=None):
    return LayerCost(
        name,
        sensitivity={4: sens4, 8: 0.0},
        weight_bytes={4: bytes8 / 2, 8: bytes8},
        bops={4: (bops8 or bytes8) / 2, 8: bops8 or bytes8},
        latency=None if lat is None else {4: lat[0], 8: lat[1]},
    )


def _brute_force(layers, kind, limit, ties=()):
    best = None
    for bits in itertools.product((4, 8), repeat=len(layers)):
        chosen = dict(zip((layer.name for layer in layers), bits, strict=True))
        if any(len({chosen[n] for n in tie}) > 1 for tie in ties):
            continue
        cost = sum(layer.cost(kind, chosen[layer.name]) for layer in layers)
        sens = sum(layer.sensitivity[chosen[layer.name]] for layer in layers)
        if cost <= limit + 1e-9 and (best is None or sens < best[0] - 1e-12):
            best = (sens, chosen)
    return best


def test_known_optimum_on_a_small_table():
    # INT8 bytes total 1000; budget 0.75 -> 750, so 500 bytes of INT8 weights must halve.
    # Halving a (400) + b (100) costs 1 + 1 = 2; halving c (500) alone costs 5.
    layers = [_layer("a", 1.0, 400), _layer("b", 1.0, 100), _layer("c", 5.0, 500)]
    result = allocate_bits(layers, Budget(BudgetKind.SIZE, 0.75))
    assert result.bits == {"a": 4, "b": 4, "c": 8}
    assert result.sensitivity == pytest.approx(2.0)
    assert result.cost == pytest.approx(750.0)
    assert result.reference_cost == pytest.approx(1000.0)


def test_a_loose_budget_keeps_every_layer_at_int8():
    layers = [_layer("a", 1.0, 400), _layer("b", 0.5, 100)]
    assert allocate_bits(layers, Budget(BudgetKind.SIZE, 1.0)).bits == {"a": 8, "b": 8}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", list(BudgetKind))
def test_matches_brute_force_on_random_tables(seed, kind):
    rng = np.random.default_rng(seed)
    layers = [
        _layer(f"l{i}", float(rng.uniform(0, 3)), float(rng.integers(10, 1000)),
               lat=(float(rng.uniform(1, 2)), float(rng.uniform(1.5, 3))),
               bops8=float(rng.integers(100, 10000)))
        for i in range(8)
    ]
    ties = [("l1", "l2"), ("l5", "l6", "l7")] if seed % 2 else []
    reference = sum(layer.cost(kind, 8) for layer in layers)
    least = sum(min(layer.cost(kind, 4), layer.cost(kind, 8)) for layer in layers) / reference
    fraction = least + float(rng.uniform(0.1, 0.9)) * (1.0 - least)
    result = allocate_bits(layers, Budget(kind, fraction), ties=ties)
    expected = _brute_force(layers, kind, fraction * reference, ties)
    assert result.sensitivity == pytest.approx(expected[0])
    assert result.cost <= fraction * reference + 1e-6
    for tie in ties:
        assert len({result.bits[n] for n in tie}) == 1


def test_tied_layers_take_the_same_bits():
    # Alone, halving "a" (cheap, sensitive-free) is best; tied to "b" it drags b along,
    # so the solver halves "c" instead.
    layers = [_layer("a", 0.0, 300), _layer("b", 10.0, 300), _layer("c", 1.0, 400)]
    budget = Budget(BudgetKind.SIZE, 0.85)  # 850 of 1000: save >= 150 bytes
    assert allocate_bits(layers, budget).bits == {"a": 4, "b": 8, "c": 8}
    tied = allocate_bits(layers, budget, ties=[("a", "b")])
    assert tied.bits == {"a": 8, "b": 8, "c": 4}


def test_fixed_layers_win_over_the_solver():
    layers = [_layer("a", 0.0, 300), _layer("b", 1.0, 300), _layer("c", 1.0, 400)]
    result = allocate_bits(layers, Budget(BudgetKind.SIZE, 0.8), fixed={"a": 8, "c": 4})
    assert result.bits == {"a": 8, "b": 8, "c": 4}


def test_latency_budget_uses_measured_latencies():
    # "a" has few bytes but its INT4 kernel is much faster; "b" the other way round.
    layers = [_layer("a", 1.0, 100, lat=(1.0, 5.0)), _layer("b", 0.5, 900, lat=(4.9, 5.0))]
    assert allocate_bits(layers, Budget(BudgetKind.LATENCY, 0.6)).bits == {"a": 4, "b": 8}
    assert allocate_bits(layers, Budget(BudgetKind.SIZE, 0.6)).bits == {"a": 8, "b": 4}


def test_infeasible_size_budget_names_the_smallest_feasible_value():
    layers = [_layer("a", 1.0, 400), _layer("b", 1.0, 600)]
    with pytest.raises(ConfigError, match=r"--size-budget 0\.3 .*infeasible.*smallest "
                                          r"feasible value is 0\.5000"):
        allocate_bits(layers, Budget(BudgetKind.SIZE, 0.3))
    assert allocate_bits(layers, Budget(BudgetKind.SIZE, 0.5)).bits == {"a": 4, "b": 4}


def test_infeasible_budget_counts_fixed_and_tied_layers():
    layers = [_layer("a", 1.0, 400), _layer("b", 1.0, 600)]
    # "b" stays INT8: the least is 200 + 600 = 800 of 1000.
    with pytest.raises(ConfigError, match=r"smallest feasible value is 0\.8000"):
        allocate_bits(layers, Budget(BudgetKind.SIZE, 0.6), fixed={"b": 8})
    with pytest.raises(ConfigError, match=r"--size-budget 0\.0005MB is infeasible.*"
                                          r"smallest feasible value is 0\.0008MB"):
        allocate_bits(layers, Budget.parse("size", "0.0005MB"), fixed={"b": 8})
    with pytest.raises(ConfigError, match=r"must share a scale.*overrides give them"):
        allocate_bits(layers, Budget(BudgetKind.SIZE, 0.9), ties=[("a", "b")],
                      fixed={"a": 4, "b": 8})


def test_latency_budget_without_latencies_is_a_clear_error():
    with pytest.raises(ConfigError, match="--latency-budget needs measured latencies"):
        allocate_bits([_layer("a", 1.0, 100)], Budget(BudgetKind.LATENCY, 0.9))


@pytest.mark.parametrize(
    ("kind", "text", "value", "relative"),
    [("size", "0.6", 0.6, True), ("size", "1.5MB", 1.5e6, False),
     ("latency", "2ms", 2e-3, False), ("bops", "3G", 3e9, False), ("bops", "1", 1.0, True)],
)
def test_budget_parse(kind, text, value, relative):
    budget = Budget.parse(kind, text)
    assert budget.value == pytest.approx(value) and budget.relative is relative


@pytest.mark.parametrize(
    ("kind", "text", "match"),
    [("size", "1.5", "above 1"), ("size", "lots", "is not a budget"),
     ("latency", "3MB", "is not a budget"), ("size", "0", "positive number")],
)
def test_budget_parse_errors(kind, text, match):
    with pytest.raises(ConfigError, match=match):
        Budget.parse(kind, text)


def test_unknown_names_are_errors():
    layers = [_layer("a", 1.0, 100)]
    with pytest.raises(ConfigError, match=r"tie group .* names layer 'z'"):
        allocate_bits(layers, Budget(BudgetKind.SIZE, 0.9), ties=[("a", "z")])
    with pytest.raises(ConfigError, match="names layer 'z', which is not quantizable"):
        allocate_bits(layers, Budget(BudgetKind.SIZE, 0.9), fixed={"z": 4})


def _macs_layer(name, sens4, macs):
    # bops at 8-bit activations: MACs x weight bits x 8.
    return LayerCost(name, sensitivity={4: sens4, 8: 0.0}, weight_bytes={4: 1.0, 8: 2.0},
                     bops={4: macs * 4 * 8, 8: macs * 8 * 8})


def _activation_table():
    # Three layers of 100 MACs (INT8 bops 3 x 6400). "a" reads one tensor; "b" and "c" read
    # another, which is one choice for both (W8A4 saves 3200 bops per layer).
    layers = [_macs_layer("a", 1.0, 100), _macs_layer("b", 5.0, 100),
              _macs_layer("c", 5.0, 100)]
    groups = [ActivationGroup("x", ("a",), {4: 0.1, 8: 0.0}),
              ActivationGroup("y", ("b", "c"), {4: 0.6, 8: 0.0})]
    return layers, groups


def _brute_force_with_activations(layers, groups, limit):
    best = None
    for weights in itertools.product((4, 8), repeat=len(layers)):
        for acts in itertools.product((4, 8), repeat=len(groups)):
            w = dict(zip((layer.name for layer in layers), weights, strict=True))
            a = {name: bits for group, bits in zip(groups, acts, strict=True)
                 for name in group.readers}
            cost = sum(layer.cost(BudgetKind.BOPS, w[layer.name], a[layer.name])
                       for layer in layers)
            sens = (sum(layer.sensitivity[w[layer.name]] for layer in layers)
                    + sum(g.sensitivity[b] for g, b in zip(groups, acts, strict=True)))
            if cost <= limit + 1e-9 and (best is None or sens < best[0] - 1e-12):
                best = (sens, w, a)
    return best


@pytest.mark.parametrize("fraction", [1.0, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25])
def test_activation_widths_match_brute_force(fraction):
    layers, groups = _activation_table()
    result = allocate_bits(layers, Budget(BudgetKind.BOPS, fraction), activations=groups)
    sens, *_ = _brute_force_with_activations(layers, groups, fraction * 19200)
    assert result.sensitivity == pytest.approx(sens)
    assert result.cost <= fraction * 19200 + 1e-6
    assert result.activation_bits["b"] == result.activation_bits["c"]  # one tensor


def test_shared_tensor_sensitivity_counts_once():
    # At 0.75 (14400 of 19200 bops) the tensor "b" and "c" read goes to 4 bits: 6400 bops
    # saved for 0.6. Counted once per reader (1.2) it would lose to W4A4 "a" (1.1).
    layers, groups = _activation_table()
    result = allocate_bits(layers, Budget(BudgetKind.BOPS, 0.75), activations=groups)
    assert result.bits == {"a": 8, "b": 8, "c": 8}
    assert result.activation_bits == {"a": 8, "b": 4, "c": 4}
    assert result.sensitivity == pytest.approx(0.6) and result.cost == pytest.approx(12800)


def test_activation_widths_reach_budgets_weights_alone_cannot():
    layers, groups = _activation_table()
    # Weights alone reach half the bops at best; W4A4 everywhere a quarter.
    with pytest.raises(ConfigError, match=r"smallest feasible value is 0\.5000"):
        allocate_bits(layers, Budget(BudgetKind.BOPS, 0.4))
    assert allocate_bits(layers, Budget(BudgetKind.BOPS, 0.4),
                         activations=groups).cost <= 0.4 * 19200
    with pytest.raises(ConfigError, match=r"smallest feasible value is 0\.2500"):
        allocate_bits(layers, Budget(BudgetKind.BOPS, 0.2), activations=groups)
    # A fixed weight width still holds; the size budget ignores activation widths.
    fixed = allocate_bits(layers, Budget(BudgetKind.BOPS, 0.5), activations=groups,
                          fixed={"b": 8})
    assert fixed.bits["b"] == 8 and fixed.cost <= 0.5 * 19200
    size = allocate_bits(layers, Budget(BudgetKind.SIZE, 1.0), activations=groups)
    assert size.activation_bits == {"a": 8, "b": 8, "c": 8}


def test_activation_group_errors():
    layers, _ = _activation_table()
    with pytest.raises(ConfigError, match="names layer 'z'"):
        allocate_bits(layers, Budget(BudgetKind.BOPS, 0.9),
                      activations=[ActivationGroup("x", ("z",), {4: 0.1, 8: 0.0})])
    with pytest.raises(ConfigError, match="reader of two activation groups"):
        allocate_bits(layers, Budget(BudgetKind.BOPS, 0.9), activations=[
            ActivationGroup("x", ("a",), {4: 0.1, 8: 0.0}),
            ActivationGroup("y", ("a",), {4: 0.1, 8: 0.0})])
