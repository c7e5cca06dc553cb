"""Identity centers: the normalised mean feature of each identity, in one sequential pass.

The rows of an im2rec-packed dataset are shuffled, so the sums are accumulated block by block
(``torch.index_add_``) while the feature file is read once from start to end.
"""
import numpy as np
import torch


def identity_centers(features, labels, *, centers=None, chunk_rows=1 << 16, progress=False, norms=False):
    """Returns ``(ids, C, counts)``: the labels present (sorted), their unit-norm centers C
    (float32, len(ids) x d) and their face counts; with ``norms=True`` also ``|S|``, the norm of
    each identity's sum of unit rows (C = S / |S|; None with ``centers``), from which a face's
    cosine to its identity's center without that face follows.

    Args:
        features: N x d rows (a memory-mapped float16 ``features.npy`` is read sequentially once).
        labels: N identity labels y_i.
        centers: optional num_classes x d centers (e.g. the proxy model's PartialFC weights)
            used instead of the mean features; only their rows of present labels are taken.
    """
    labels = np.asarray(labels, np.int64)
    if len(labels) != len(features):
        raise ValueError(f"{len(labels)} labels for {len(features)} feature rows")
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if centers is not None:
        c = np.asarray(centers, np.float32)
        if c.ndim != 2 or c.shape[1] != features.shape[1] or (len(ids) and ids[-1] >= len(c)):
            raise ValueError(f"centers must be a (num_classes x {features.shape[1]}) array covering label "
                             f"{int(ids[-1]) if len(ids) else 0}, got shape {c.shape}")
        c = _unit(np.ascontiguousarray(c[ids]))[0]
        return (ids, c, counts, None) if norms else (ids, c, counts)
    sums = torch.zeros((len(ids), features.shape[1]), dtype=torch.float32)
    inv = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    steps = range(0, len(labels), chunk_rows)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="centers", unit="block", leave=False)
    for s in steps:
        block = torch.from_numpy(np.asarray(features[s:s + chunk_rows], np.float32))
        n = torch.linalg.vector_norm(block, dim=1)
        bad = ~torch.isfinite(n) | (n == 0)
        if bool(bad.any()):
            source = getattr(features, "filename", None) or "features"
            raise ValueError(f"{source}: row {s + int(torch.nonzero(bad)[0, 0])} is not finite or all zero, so it "
                             f"has no direction; extract the features again")
        block = block / n[:, None]
        sums.index_add_(0, inv[s:s + len(block)], block)
    c, lengths = _unit(sums.numpy())
    return (ids, c, counts, lengths) if norms else (ids, c, counts)


def _unit(c):
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} identity center(s), the first at position {int(np.flatnonzero(bad)[0])}, "
                         f"are not finite or zero: the features of that identity cancel out or are broken")
    c /= norms
    return c, norms[:, 0]


def leave_one_out(g, length):
    """cos(f, S - f): a unit face f against its identity's center without it, from g = cos(f, S/|S|)
    and ``length`` = |S| (S the sum of the identity's unit features). numpy arrays or torch tensors."""
    return (length * g - 1) / (length * length - 2 * length * g + 1).clip(min=1e-12) ** 0.5
