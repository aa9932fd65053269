"""A bit budget spread over layers: each layer takes one of its options (a compressor and an
adapter rank, priced in exact stored bits, with a measured sensitivity) so that the bits add up
to at most the budget and the summed sensitivity is smallest.

That is the multiple-choice knapsack problem. ``solve_exact`` keeps, layer after layer, every
partial choice no other partial choice beats (fewer or as many bits and a lower sum): exact,
and small enough when layers have a few options each. Past ``max_states`` partial choices it
gives up and ``solve`` falls back on ``solve_greedy``: the upgrades along each layer's lower
convex hull, best sensitivity drop per bit first, whose linear relaxation (Sinha and Zoltners,
Operations Research 27(3), 1979) bounds the optimum from below, so the greedy answer states how
far from the optimum it can at most be. Pure functions on plain numbers: the measuring lives
with the network (``train_evaluate.training.budget``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass


class BudgetError(ValueError):
    """The budget cannot be met: even the cheapest option of every layer (``cheapest_bits``)
    is over it."""

    def __init__(self, message: str, cheapest_bits: int) -> None:
        super().__init__(message)
        self.cheapest_bits = cheapest_bits


class SensitivityError(ValueError):
    """An option's sensitivity is NaN or infinite: no two sums could be compared."""


@dataclass(frozen=True)
class Option:
    """One way to store one layer: its label, the bits it stores, its sensitivity."""

    label: str
    bits: int
    sensitivity: float


@dataclass(frozen=True)
class Allocation:
    """Which option each layer takes (an index into its options), their bits and summed
    sensitivity; ``bound``: a lower bound on the best summed sensitivity within the budget
    (the sum itself when ``exact``)."""

    choice: tuple[int, ...]
    bits: int
    sensitivity: float
    exact: bool
    bound: float

    @property
    def gap(self) -> float:
        """How much above the optimum the sum can at most be (0 when exact)."""
        return max(0.0, self.sensitivity - self.bound)


def _check(options: Sequence[Sequence[Option]], budget_bits: int) -> None:
    if not options or any(not layer for layer in options):
        raise ValueError("every layer needs at least one option")
    for layer in options:
        for option in layer:
            if not math.isfinite(option.sensitivity):
                raise SensitivityError(
                    f"option {option.label} has sensitivity {option.sensitivity}; every "
                    "sensitivity must be a finite number"
                )
    cheapest = sum(min(o.bits for o in layer) for layer in options)
    if cheapest > budget_bits:
        raise BudgetError(
            f"the cheapest option of every layer stores {cheapest} bits, over the budget of "
            f"{budget_bits}",
            cheapest,
        )


def _allocation(options, choice, exact: bool, bound: float | None = None) -> Allocation:
    picked = [layer[k] for layer, k in zip(options, choice, strict=True)]
    total = math.fsum(o.sensitivity for o in picked)
    return Allocation(
        tuple(choice), sum(o.bits for o in picked), total, exact, total if bound is None else bound
    )


def brute_force(options: Sequence[Sequence[Option]], budget_bits: int) -> Allocation:
    """Every combination tried (for checking the solvers on small problems): the smallest
    sum within the budget, ties to fewer bits, then to the first combination."""
    _check(options, budget_bits)
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in options)):
        picked = [layer[k] for layer, k in zip(options, choice, strict=True)]
        bits = sum(o.bits for o in picked)
        if bits > budget_bits:
            continue
        key = (math.fsum(o.sensitivity for o in picked), bits)
        if best is None or key < best[0]:
            best = (key, choice)
    return _allocation(options, best[1], exact=True)


def solve_exact(
    options: Sequence[Sequence[Option]], budget_bits: int, max_states: int = 200_000
) -> Allocation | None:
    """The optimum, or None when the partial choices kept grow past ``max_states``."""
    _check(options, budget_bits)
    # the fewest bits the layers after each one can take: a partial choice that cannot be
    # completed within the budget is dropped at once
    rest = [0] * (len(options) + 1)
    for i in range(len(options) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(o.bits for o in options[i])
    frontier = [(0, 0.0)]  # (bits, sum) of each kept partial choice
    parents: list[list[tuple[int, int]]] = []  # per layer: (index in the previous, option)
    for i, layer in enumerate(options):
        candidates = [
            (bits + o.bits, total + o.sensitivity, j, k)
            for j, (bits, total) in enumerate(frontier)
            for k, o in enumerate(layer)
            if bits + o.bits + rest[i + 1] <= budget_bits
        ]
        candidates.sort(key=lambda c: (c[0], c[1]))
        kept, links, lowest = [], [], math.inf
        for bits, total, j, k in candidates:
            if total < lowest:  # beats every kept choice with at most its bits
                kept.append((bits, total))
                links.append((j, k))
                lowest = total
        if len(kept) > max_states:
            return None
        frontier = kept
        parents.append(links)
    # the last kept choice has the smallest sum (sums fall as bits grow along the frontier)
    index, choice = len(frontier) - 1, []
    for links in reversed(parents):
        index, k = links[index]
        choice.append(k)
    return _allocation(options, choice[::-1], exact=True)


def _hull(layer: Sequence[Option]) -> list[int]:
    """The option indices on the lower convex hull of (bits, sensitivity) that each lower the
    sensitivity, by bits: the only ones a linear relaxation ever takes."""
    order = sorted(range(len(layer)), key=lambda k: (layer[k].bits, layer[k].sensitivity))
    hull: list[int] = []
    for k in order:
        if hull and layer[k].sensitivity >= layer[hull[-1]].sensitivity:
            continue  # no better than a cheaper option
        while len(hull) >= 2:
            a, b = layer[hull[-2]], layer[hull[-1]]
            # b lies on or above the line from a to k: a mix of a and k is as good for less
            if (b.sensitivity - a.sensitivity) * (layer[k].bits - a.bits) >= (
                layer[k].sensitivity - a.sensitivity
            ) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def solve_greedy(options: Sequence[Sequence[Option]], budget_bits: int) -> Allocation:
    """A good allocation and a lower bound on the optimum.

    Every layer starts at its cheapest option; the upgrades along the layers' hulls are taken
    best drop per bit first while they fit, a layer's later upgrades skipped once one of its
    upgrades does not fit. The bound is the linear relaxation's optimum: the same order, with
    the first upgrade that does not fit taken in part. Last, each layer in turn moves to the
    option that lowers the sum most within what is left (any option, not only the hull's)."""
    _check(options, budget_bits)
    hulls = [_hull(layer) for layer in options]
    choice = [hull[0] for hull in hulls]
    steps = []
    for i, (layer, hull) in enumerate(zip(options, hulls, strict=True)):
        rate = math.inf
        for s in range(len(hull) - 1):
            drop = layer[hull[s]].sensitivity - layer[hull[s + 1]].sensitivity
            # a hull's rates fall; on points collinear to within rounding the division can
            # put a later step ahead of an earlier one, which must never be taken first
            rate = min(rate, drop / (layer[hull[s + 1]].bits - layer[hull[s]].bits))
            steps.append((rate, i, s))
    steps.sort(key=lambda step: -step[0])  # stable: a layer's equal rates stay in order
    left = budget_bits - sum(layer[k].bits for layer, k in zip(options, choice, strict=True))
    relaxed = math.fsum(layer[k].sensitivity for layer, k in zip(options, choice, strict=True))
    bound, blocked = None, set()
    for _rate, i, s in steps:
        layer, hull = options[i], hulls[i]
        extra = layer[hull[s + 1]].bits - layer[hull[s]].bits
        drop = layer[hull[s]].sensitivity - layer[hull[s + 1]].sensitivity
        if bound is None:
            if extra <= left:
                relaxed -= drop
            else:
                bound = relaxed - drop * left / extra
        if i in blocked or extra > left or choice[i] != hull[s]:
            blocked.add(i)
            continue
        choice[i] = hull[s + 1]
        left -= extra
    if bound is None:  # every upgrade fitted: the hull's ends are the optimum
        bound = relaxed
    for i, layer in enumerate(options):
        current = layer[choice[i]]
        better = [
            k
            for k, o in enumerate(layer)
            if o.bits - current.bits <= left and o.sensitivity < current.sensitivity
        ]
        if better:
            k = min(better, key=lambda k: (layer[k].sensitivity, layer[k].bits))
            left -= layer[k].bits - current.bits
            choice[i] = k
    return _allocation(options, choice, exact=False, bound=bound)


def solve(
    options: Sequence[Sequence[Option]], budget_bits: int, max_states: int = 200_000
) -> Allocation:
    """The exact optimum when it stays within ``max_states`` partial choices, else the greedy
    allocation with its bound."""
    exact = solve_exact(options, budget_bits, max_states)
    return exact if exact is not None else solve_greedy(options, budget_bits)
