"""Bit allocation for mixed INT4/INT8: an integer program over a per-layer cost table.

The "select bits" step of the quantization flow: it runs after the per-layer costs are
known (sensitivity from the calibration data, weight bytes and bit-operations from the
shapes, latency measured on the target) and before ``AnnotateQuantization`` writes the
chosen bits as per-layer overrides. It is a pure function of the table, so it is tested
on hand-made tables.

The program (HAWQ-V3's): one binary ``x[l, b]`` per layer ``l`` and bit width ``b``,
``sum_b x[l, b] = 1``; minimize ``sum sensitivity[l, b] * x[l, b]`` subject to
``sum cost[l, b] * x[l, b] <= budget`` for the budget's cost (weight bytes, latency or
bit-operations). Layers that must share a scale (both inputs of a residual add, the
inputs of a concat) are tied: ``x[l, b] = x[m, b]``. Fixed layers (per-node overrides)
take their bits whatever the solver would prefer. Solved with ``scipy.optimize.milp``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from ..errors import ConfigError


class BudgetKind(StrEnum):
    """What a budget limits; each maps onto one ``tvmq compile`` flag."""

    SIZE = "size"
    LATENCY = "latency"
    BOPS = "bops"

    @property
    def flag(self) -> str:
        return f"--{self.value}-budget"


# The unit an absolute budget is written in, per kind (a bare number <= 1 is a fraction).
_UNITS = {
    BudgetKind.SIZE: {"b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9},
    BudgetKind.LATENCY: {"us": 1e-6, "ms": 1e-3, "s": 1.0},
    BudgetKind.BOPS: {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12},
}
_DESCRIBE = {
    BudgetKind.SIZE: "the INT8 weight bytes",
    BudgetKind.LATENCY: "the INT8 latency",
    BudgetKind.BOPS: "the INT8 bit-operations",
}


@dataclass(frozen=True)
class Budget:
    """A limit on the total of one cost.

    Attributes
    ----------
    kind : BudgetKind
        Weight bytes, latency (seconds) or bit-operations.
    value : float
        A fraction of the all-INT8 total when ``relative``, else an absolute amount
        (bytes, seconds or bit-operations).
    relative : bool
        Whether ``value`` is a fraction of the all-INT8 model's cost.
    """

    kind: BudgetKind
    value: float
    relative: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", BudgetKind(self.kind))
        except ValueError:
            kinds = ", ".join(k.value for k in BudgetKind)
            raise ConfigError(f"budget kind {self.kind!r} is not one of: {kinds}") from None
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
                or not np.isfinite(value):
            raise ConfigError(f"{self.kind.flag} {value!r} is not valid; use a positive number")
        if self.relative and value > 1.0 + 1e-12:
            raise ConfigError(
                f"{self.kind.flag} {value!r} is above 1 (the all-INT8 model); use a fraction "
                "in (0, 1]" + (" or an amount such as 1.5MB" if self.kind == "size" else "")
            )

    @classmethod
    def parse(cls, kind: BudgetKind | str, text: str) -> Budget:
        """``"0.6"`` (a fraction of INT8), or an amount: ``"1.5MB"``, ``"2ms"``, ``"3G"``."""
        kind = BudgetKind(kind)
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*",
                             str(text))
        units = _UNITS[kind]
        if match is None or (match.group(2) and match.group(2).lower() not in units):
            examples = {BudgetKind.SIZE: "0.6 or 1.5MB", BudgetKind.LATENCY: "0.6 or 2ms",
                        BudgetKind.BOPS: "0.6 or 3G"}[kind]
            raise ConfigError(
                f"{kind.flag} {text!r} is not a budget; write a fraction of the INT8 model "
                f"or an amount, e.g. {examples}"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
        if not unit:
            return cls(kind, number, relative=True)
        return cls(kind, number * units[unit], relative=False)

    def describe(self, amount: float, reference: float) -> str:
        """An amount written the way this budget was given."""
        if self.relative:
            return f"{amount / reference:.4g} (of {_DESCRIBE[self.kind]})"
        if self.kind == BudgetKind.SIZE:
            return f"{amount / 1e6:.6g}MB"
        if self.kind == BudgetKind.LATENCY:
            return f"{amount * 1e3:.6g}ms"
        return f"{amount / 1e9:.6g}G"


@dataclass(frozen=True)
class LayerCost:
    """One quantizable layer's row of the cost table; every mapping is keyed by bits.

    Attributes
    ----------
    name : str
        The layer name (``conv2d_0``).
    sensitivity : mapping of int to float
        How much the network's output degrades with this layer at each width (0 at 8).
    weight_bytes, bops : mapping of int to float
        Packed weight bytes and bit-operations at each width.
    latency : mapping of int to float, optional
        Measured kernel seconds at each width; needed only by a latency budget.
    """

    name: str
    sensitivity: Mapping[int, float]
    weight_bytes: Mapping[int, float]
    bops: Mapping[int, float]
    latency: Mapping[int, float] | None = None
    bits: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        bits = tuple(sorted(self.sensitivity))
        if not bits:
            raise ConfigError(f"layer {self.name!r} has no bit widths in its cost table")
        for label in ("weight_bytes", "bops", "latency"):
            table = getattr(self, label)
            if table is not None and set(table) != set(bits):
                raise ConfigError(
                    f"layer {self.name!r}: {label} has bits {sorted(table)} but sensitivity "
                    f"has {list(bits)}"
                )
        object.__setattr__(self, "bits", bits)

    def cost(self, kind: BudgetKind, bits: int) -> float:
        if kind == BudgetKind.SIZE:
            return float(self.weight_bytes[bits])
        if kind == BudgetKind.BOPS:
            return float(self.bops[bits])
        if self.latency is None:
            raise ConfigError(
                f"--latency-budget needs measured latencies, and layer {self.name!r} has none; "
                "use --size-budget or --bops-budget"
            )
        return float(self.latency[bits])


@dataclass(frozen=True)
class Allocation:
    """The solver's answer: bits per layer and the totals they give."""

    bits: Mapping[str, int]
    sensitivity: float
    cost: float
    reference_cost: float


def allocate_bits(
    layers: Sequence[LayerCost],
    budget: Budget,
    *,
    ties: Iterable[Iterable[str]] = (),
    fixed: Mapping[str, int] | None = None,
) -> Allocation:
    """Choose each layer's bits: least total sensitivity whose cost fits the budget.

    Parameters
    ----------
    layers : sequence of LayerCost
        The cost table.
    budget : Budget
        The limit; a relative one is a fraction of the cost with every layer at its widest.
    ties : iterable of iterables of str
        Groups of layer names that must take the same bits.
    fixed : mapping of str to int, optional
        Layers whose bits are given (per-node overrides); the solver works around them.

    Raises
    ------
    ConfigError
        The budget is infeasible (the message names the smallest feasible value), or a
        tie, fixed layer or bit width names nothing in the table.
    """
    fixed = dict(fixed or {})
    index = {layer.name: i for i, layer in enumerate(layers)}
    groups = _groups(layers, index, ties)
    for name, bits in fixed.items():
        if name not in index:
            raise ConfigError(f"bit override names layer {name!r}, which is not quantizable")
        if bits not in layers[index[name]].bits:
            raise ConfigError(
                f"layer {name!r} cannot take {bits} bits; its widths are "
                f"{list(layers[index[name]].bits)}"
            )
    for group in groups:
        wanted = {fixed[layers[i].name] for i in group if layers[i].name in fixed}
        if len(wanted) > 1:
            names = ", ".join(layers[i].name for i in group)
            raise ConfigError(
                f"layers {names} must share a scale, so they take the same bits, but the "
                f"overrides give them {sorted(wanted)}; give them one width"
            )
    kind = budget.kind
    reference = sum(layer.cost(kind, max(layer.bits)) for layer in layers)
    limit = budget.value * reference if budget.relative else budget.value
    # Each tie group picks one width from those all its layers offer.
    choices = []
    for group in groups:
        common = set.intersection(*(set(layers[i].bits) for i in group))
        pinned = {fixed[layers[i].name] for i in group if layers[i].name in fixed}
        widths = sorted(pinned or common)
        if not widths:
            names = ", ".join(layers[i].name for i in group)
            raise ConfigError(f"tied layers {names} have no bit width in common")
        choices.append(widths)
    sens = [[sum(layers[i].sensitivity[b] for i in g) for b in w]
            for g, w in zip(groups, choices, strict=True)]
    cost = [[sum(layers[i].cost(kind, b) for i in g) for b in w]
            for g, w in zip(groups, choices, strict=True)]
    smallest = sum(min(c) for c in cost)
    tolerance = 1e-9 * max(reference, 1e-30)
    if smallest > limit + tolerance:
        given = budget.describe(limit, reference)
        least = budget.describe(smallest, reference)
        if budget.relative:
            # Round the fraction up, so the value the message names is itself feasible.
            least = f"{np.ceil(smallest / reference * 1e4) / 1e4:.4f} (of {_DESCRIBE[kind]})"
        raise ConfigError(
            f"{kind.flag} {given} is infeasible: the smallest feasible value is {least}, "
            "with every layer at its cheapest allowed width"
        )
    picks = _solve(sens, cost, limit + tolerance)
    bits: dict[str, int] = {}
    for g, w, k in zip(groups, choices, picks, strict=True):
        for i in g:
            bits[layers[i].name] = w[k]
    total_sens = sum(s[k] for s, k in zip(sens, picks, strict=True))
    total_cost = sum(c[k] for c, k in zip(cost, picks, strict=True))
    ordered = {layer.name: bits[layer.name] for layer in layers}
    return Allocation(ordered, float(total_sens), float(total_cost), float(reference))


def _groups(layers, index, ties) -> list[list[int]]:
    """Union-find over the ties: every layer in exactly one group, in table order."""
    parent = list(range(len(layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for tie in ties:
        members = list(tie)
        for name in members:
            if name not in index:
                raise ConfigError(f"tie group {members} names layer {name!r}, which is not "
                                  "in the cost table")
        for a, b in itertools.pairwise(members):
            parent[root(index[a])] = root(index[b])
    grouped: dict[int, list[int]] = {}
    for i in range(len(layers)):
        grouped.setdefault(root(i), []).append(i)
    return sorted(grouped.values(), key=lambda g: g[0])


def _solve(sens: list[list[float]], cost: list[list[float]], limit: float) -> list[int]:
    """The MILP: one binary per (group, width), one width per group, cost under limit."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(s) for s in sens]
    n = sum(sizes)
    objective = np.concatenate([np.asarray(s, dtype="float64") for s in sens])
    one_each = np.zeros((len(sizes), n))
    start = 0
    for g, size in enumerate(sizes):
        one_each[g, start : start + size] = 1
        start += size
    costs = np.concatenate([np.asarray(c, dtype="float64") for c in cost])[None, :]
    result = milp(
        objective,
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(costs, -np.inf, limit)],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
    )
    assert result.success, result.message  # feasibility was checked before
    x = np.round(result.x).astype(int)
    picks, start = [], 0
    for size in sizes:
        picks.append(int(np.argmax(x[start : start + size])))
        start += size
    return picks
