"""The global NMS threshold whose kept fraction is closest to a wanted ratio.

``evaluate(thresholds) -> kept fractions`` decides a grid of thresholds at once (one streamed
pass over the features, or a pass over cached cosines of an identity sample). The grid is
refined around the crossing of the wanted ratio until a threshold is within the tolerance.
"""
import numpy as np

RATIO_TOLERANCE = 0.005


def refine(evaluate, ratio, lo, hi, tried, grid=16, rounds=6, tol=RATIO_TOLERANCE):
    """Grid refinement of the threshold whose kept fraction is closest to ``ratio`` (ties: lower).

    ``tried`` (threshold -> fraction) receives every evaluation. Returns the best threshold and
    the number of evaluations made.
    """
    calls = 0
    best = None
    for _ in range(rounds):
        todo = [float(t) for t in np.unique(np.linspace(lo, hi, grid)) if float(t) not in tried]
        if todo:
            tried.update(zip(todo, evaluate(np.array(todo))))
            calls += 1
        best = closest(tried, ratio)
        if abs(tried[best] - ratio) <= tol:
            break
        bracket = crossing(tried, ratio)
        if bracket is None:
            break  # outside what any threshold in [lo, hi] reaches
        lo, hi = bracket
        if hi - lo < 1e-7:
            break
    return best, calls


def closest(tried, ratio):
    return min(tried, key=lambda t: (abs(tried[t] - ratio), t))


def crossing(tried, ratio):
    """The adjacent pair of evaluated thresholds between which the fraction crosses ``ratio``."""
    ts = sorted(tried)
    pairs = [(x, y) for x, y in zip(ts, ts[1:]) if tried[x] < ratio <= tried[y]]
    if not pairs:
        return None
    return min(pairs, key=lambda xy: abs(tried[xy[0]] - ratio) + abs(tried[xy[1]] - ratio))


def bracket(tried, ratio, margin):
    """Thresholds where the (estimated) fraction curve crosses ratio - margin and ratio + margin."""
    ts = np.array(sorted(tried))
    fr = np.maximum.accumulate(np.array([tried[t] for t in ts]))
    lo, hi = (float(np.interp(ratio + d, fr + np.arange(len(fr)) * 1e-12, ts)) for d in (-margin, margin))
    return (lo, hi) if lo < hi else (-1.0, 1.0)
