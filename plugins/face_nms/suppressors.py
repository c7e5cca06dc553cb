"""The suppressor of each dropped face, and their cosine.

Greedy NMS drops face j when a face of its identity kept before it in rank order is closer than
the threshold T. With the selection's ranking (``ranker``: the :class:`.nms.Ranker` of its order,
centers and seed) the suppressor is the most similar of the kept faces ranked before j, and its
cosine is the quantity T acted on: above T for every dropped face. Without a ranking (an index
of unknown origin) it is the nearest kept face of the identity. Cosines are float32 products of
features normalised in float64, as the selection computes them.

Only the rows of the identities asked for are read, in row order, from the memory-mapped
feature file: the histogram takes every identity with a dropped face when they hold at most
``max_rows`` faces, else a random sample of them holding at most that many.
"""
from dataclasses import dataclass

import numpy as np
import torch

HIST_ROWS = 200_000  # rows read for the histogram, at most
_READ_ROWS = 1 << 15
_BLOCK = 1024  # dropped faces compared at once, to bound the dropped x kept product


@dataclass
class Suppressors:
    """Per dropped face (``rows``, ascending): its suppressor's row and their float32 cosine (-1 and nan
    where its identity kept no face)."""
    rows: np.ndarray
    suppressor: np.ndarray
    cosine: np.ndarray

    def of(self, rows):
        """(suppressor rows, cosines) of dropped ``rows``, which must be among ``self.rows``."""
        at = np.searchsorted(self.rows, rows)
        return self.suppressor[at], self.cosine[at]


def histogram_identities(labels, kept, max_rows=HIST_ROWS, seed=0):
    """(identities whose dropped faces the histogram takes, identities with a dropped face): all of
    them when they hold at most ``max_rows`` faces, else a random sample holding at most that many."""
    sizes = np.bincount(labels)
    dropped = np.bincount(labels[~kept], minlength=len(sizes))
    candidates = np.flatnonzero(dropped > 0)
    if sizes[candidates].sum() <= max_rows:
        return candidates, len(candidates)
    pick = np.random.default_rng(seed).permutation(candidates)
    n = max(1, int(np.searchsorted(np.cumsum(sizes[pick]), max_rows, side="right")))
    return np.sort(pick[:n]), len(candidates)


def find_suppressors(features, labels, kept, identities, source="features.npy", ranker=None):
    """:class:`Suppressors` of every dropped face of ``identities``; ``kept``: bool per row;
    ``ranker``: the selection's :class:`.nms.Ranker` (None: the nearest kept face)."""
    rows = np.flatnonzero(np.isin(labels, identities))
    X = read_rows(features, rows)
    sup = np.full(len(rows), -1, np.int64)
    cos = np.full(len(rows), np.nan, np.float32)
    order = np.argsort(labels[rows], kind="stable")
    cuts = np.flatnonzero(np.diff(labels[rows][order])) + 1
    for group in np.split(order, cuts):
        k, d = group[kept[rows[group]]], group[~kept[rows[group]]]
        if not len(d) or not len(k):
            continue
        K = _normalised(X[k], rows[k], source)
        position = _positions(ranker, X[group], rows[group], labels[rows[group[0]]]) if ranker else None
        for s in range(0, len(d), _BLOCK):
            part = d[s:s + _BLOCK]
            S = (_normalised(X[part], rows[part], source) @ K.T).clamp_(-1.0, 1.0)
            if position is not None:
                # only kept faces ranked before the dropped one can have suppressed it
                at = {int(g): i for i, g in enumerate(group)}
                pk = torch.from_numpy(position[[at[int(g)] for g in k]])
                pd = torch.from_numpy(position[[at[int(g)] for g in part]])
                S = S.masked_fill(pk[None, :] > pd[:, None], -2.0)
            best = S.max(dim=1)
            sup[part] = rows[k][best.indices.numpy()]
            cos[part] = best.values.numpy()
    dropped = ~kept[rows]
    return Suppressors(rows[dropped], sup[dropped], cos[dropped])


def _positions(ranker, X, rows, label):
    """Rank position of each of one identity's rows (ascending), as the selection ranked them."""
    _, ranked = ranker.rank(np.asarray(X)[None], np.asarray(rows)[None], np.array([label]), pairwise=False)
    position = np.empty(len(rows), np.int64)
    position[np.searchsorted(rows, ranked[0].cpu().numpy())] = np.arange(len(rows))
    return position


def read_rows(features, rows):
    """Rows (ascending) of a memory-mapped array, read in order in chunks."""
    out = np.empty((len(rows), features.shape[1]), features.dtype)
    for s in range(0, len(rows), _READ_ROWS):
        out[s:s + _READ_ROWS] = features[rows[s:s + _READ_ROWS]]
    return out


def _normalised(X, rows, source):
    X64 = torch.from_numpy(np.asarray(X, np.float64))
    norm = torch.linalg.vector_norm(X64, dim=1, keepdim=True)
    good = torch.isfinite(norm[:, 0]) & (norm[:, 0] > 0)
    if not bool(good.all()):
        raise ValueError(f"{source}: row {int(rows[(~good).numpy()][0])} is not finite or all zero; extract the "
                         f"features again")
    return (X64 / norm).float()
