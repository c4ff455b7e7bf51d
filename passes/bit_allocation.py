"""Bit allocation for mixed INT4/INT8: an integer program over a per-layer cost table.

The "select bits" step of the quantization flow: it runs after the per-layer costs are
known (sensitivity from the calibration data, weight bytes and bit-operations from the
shapes, latency measured on the target) and before ``AnnotateQuantization`` writes the
chosen bits as per-layer overrides. It is a pure function of the table, so it is tested
on hand-made tables.

The program (HAWQ-V3's): one binary ``x[l, w, a]`` per layer ``l``, weight width ``w``
and activation width ``a``, ``sum x[l, ., .] = 1``; minimize the total sensitivity subject
to ``sum cost[l, w, a] * x[l, w, a] <= budget`` for the budget's cost (weight bytes,
latency or bit-operations, which are MACs x w x a). Layers that must share a scale (both
inputs of a residual add, the inputs of a concat) are tied: their weight widths are equal.
A layer's activation width is its input tensor's, so where the solver chooses activation
bits (``ActivationGroup``: the tensors a group of layers read, tied to one scale) every
reader of the group takes the same ``a``, and the group's sensitivity at ``a`` is counted
once. Fixed layers (per-node overrides) take their bits whatever the solver would prefer.
Solved with ``scipy.optimize.milp``.
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
    activation_bits : int
        The activation width ``bops`` are given at; where an ``ActivationGroup`` chooses
        the layer's activation width, its bit-operations scale with it.
    """

    name: str
    sensitivity: Mapping[int, float]
    weight_bytes: Mapping[int, float]
    bops: Mapping[int, float]
    latency: Mapping[int, float] | None = None
    activation_bits: int = 8
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

    def cost(self, kind: BudgetKind, bits: int, activation_bits: int | None = None) -> float:
        """The layer's ``kind`` of cost with ``bits``-wide weights, reading activations
        ``activation_bits`` wide (default: its own ``activation_bits``). Weight bytes and
        latency do not depend on the activation width (on CPUs a 4-bit activation runs the
        8-bit kernel)."""
        if kind == BudgetKind.SIZE:
            return float(self.weight_bytes[bits])
        if kind == BudgetKind.BOPS:
            scale = 1.0 if activation_bits is None else activation_bits / self.activation_bits
            return float(self.bops[bits]) * scale
        if self.latency is None:
            raise ConfigError(
                f"--latency-budget needs measured latencies, and layer {self.name!r} has none; "
                "use --size-budget or --bops-budget"
            )
        return float(self.latency[bits])


@dataclass(frozen=True)
class ActivationGroup:
    """Activation tensors whose width the solver chooses: one tensor, or tensors tied to
    one scale (behind a max-pool), read by the layers ``readers``.

    Attributes
    ----------
    name : str
        A label for messages and the report.
    readers : tuple of str
        The cost table's layers that read the group; they all take its width.
    sensitivity : mapping of int to float
        The output degradation with the group's tensors at each width (0 at 8).
    """

    name: str
    readers: tuple[str, ...]
    sensitivity: Mapping[int, float]


@dataclass(frozen=True)
class Allocation:
    """The solver's answer: bits per layer and the totals they give. ``activation_bits``
    holds the activation widths the solver chose (layers of an ``ActivationGroup``)."""

    bits: Mapping[str, int]
    sensitivity: float
    cost: float
    reference_cost: float
    activation_bits: Mapping[str, int] = field(default_factory=dict)


def allocate_bits(
    layers: Sequence[LayerCost],
    budget: Budget,
    *,
    ties: Iterable[Iterable[str]] = (),
    fixed: Mapping[str, int] | None = None,
    activations: Sequence[ActivationGroup] = (),
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
    activations : sequence of ActivationGroup
        Activation tensors whose width the solver chooses too (each layer reads at most
        one); other layers keep their ``activation_bits``.

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
    readers = _activation_readers(activations, index)
    reader_of = {i: g for g, members in enumerate(readers) for i in members}
    kind = budget.kind
    # Each tie group picks one weight width from those all its layers offer.
    widths: dict[int, list[int]] = {}
    for group in groups:
        common = set.intersection(*(set(layers[i].bits) for i in group))
        pinned = {fixed[layers[i].name] for i in group if layers[i].name in fixed}
        if not (pinned or common):
            names = ", ".join(layers[i].name for i in group)
            raise ConfigError(f"tied layers {names} have no bit width in common")
        for i in group:
            widths[i] = sorted(pinned or common)
    # The variables: one per (layer, weight width, activation width).
    options: list[tuple[int, int, int | None]] = []
    for i, layer in enumerate(layers):
        group = reader_of.get(i)
        act_widths = sorted(activations[group].sensitivity) if group is not None else [None]
        options += [(i, w, a) for w in widths[i] for a in act_widths]
    sens = np.array([layers[i].sensitivity[w] for i, w, _ in options])
    for k, (i, _, a) in enumerate(options):
        group = reader_of.get(i)
        if group is not None and readers[group][0] == i:  # counted once, on its first reader
            sens[k] += activations[group].sensitivity[a]
    cost = np.array([layers[i].cost(kind, w, a) for i, w, a in options])
    reference = sum(
        layers[i].cost(kind, max(layer.bits),
                       max(activations[reader_of[i]].sensitivity) if i in reader_of else None)
        for i, layer in enumerate(layers)
    )
    limit = budget.value * reference if budget.relative else budget.value
    equal = _one_each_and_ties(options, len(layers), [(g, 1) for g in groups]
                               + [(members, 2) for members in readers])
    smallest = float(cost @ _solve(cost, equal))
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
    x = _solve(sens, equal, (cost, limit + tolerance))
    bits: dict[str, int] = {}
    activation_bits: dict[str, int] = {}
    for (i, w, a), chosen in zip(options, x, strict=True):
        if chosen:
            bits[layers[i].name] = w
            if a is not None:
                activation_bits[layers[i].name] = a
    ordered = {layer.name: bits[layer.name] for layer in layers}
    return Allocation(ordered, float(sens @ x), float(cost @ x), float(reference),
                      activation_bits)


def _activation_readers(activations: Sequence[ActivationGroup], index) -> list[list[int]]:
    """The table indices of each activation group's readers, in table order."""
    readers, seen = [], set()
    for group in activations:
        members = []
        for name in group.readers:
            if name not in index:
                raise ConfigError(f"activation group {group.name!r} names layer {name!r}, "
                                  "which is not in the cost table")
            if index[name] in seen:
                raise ConfigError(f"layer {name!r} is a reader of two activation groups")
            seen.add(index[name])
            members.append(index[name])
        readers.append(sorted(members))
    return readers


def _one_each_and_ties(options, count: int, agree) -> np.ndarray:
    """Rows ``A`` of ``A x = 0 or 1``: one option per layer (= 1), then, for each
    (layers, position) in ``agree``, those layers' widths at that position of an option
    equal (= 0): tied layers' weight widths (1), an activation group's readers' (2). The
    last column holds the right-hand side."""
    rows = [[1.0 if o[0] == i else 0.0 for o in options] + [1.0] for i in range(count)]
    for members, position in agree:
        for i, j in itertools.pairwise(members):
            for width in sorted({o[position] for o in options if o[0] == i}):
                rows.append([(o[0] == i and o[position] == width)
                             - (o[0] == j and o[position] == width) for o in options] + [0.0])
    return np.asarray(rows, dtype="float64")


def _groups(layers, index, ties) -> list[list[int]]:
    """Every layer in exactly one group (``connected_groups`` of the ties), in table order."""
    pairs = []
    for tie in ties:
        members = list(tie)
        for name in members:
            if name not in index:
                raise ConfigError(f"tie group {members} names layer {name!r}, which is not "
                                  "in the cost table")
        pairs += [(index[a], index[b]) for a, b in itertools.pairwise(members)]
    return connected_groups(len(layers), pairs)


def connected_groups(count: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Items ``0 .. count - 1`` grouped by the pairs that join them (union-find), each group
    in order and the groups by their first item."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    grouped: dict[int, list[int]] = {}
    for i in range(count):
        grouped.setdefault(root(i), []).append(i)
    return sorted(grouped.values(), key=lambda g: g[0])


def _solve(objective: np.ndarray, equal: np.ndarray, budget=None) -> np.ndarray:
    """The MILP: binaries minimizing ``objective``, ``equal``'s rows (``_one_each_and_ties``)
    holding, and ``budget`` = (cost, limit) when given."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    constraints = [LinearConstraint(equal[:, :-1], equal[:, -1], equal[:, -1])]
    if budget is not None:
        cost, limit = budget
        constraints.append(LinearConstraint(cost[None, :], -np.inf, limit))
    result = milp(objective, constraints=constraints, integrality=np.ones(objective.size),
                  bounds=Bounds(0, 1))
    assert result.success, result.message  # feasibility was checked before
    return np.round(result.x).astype(int)
