"""Identity conflicts: one person under two labels, found by the nearness of identity centers.

1. Centers C_y: the normalised mean feature of each identity, in one sequential pass over the
   feature file (or rows of given centers, e.g. PartialFC weights).
2. The k nearest other centers of every center (``neighbours.nearest``: faiss flat or IVF on the
   CPU, exact blocked products on a GPU). Pairs whose cosine exceeds the threshold T are the
   conflicts; each pair is found from either of its two centers.
3. T from the data when not given: the cosine of each center to its nearest other center, s_y,
   is one per identity; T = median(s) + Z * 1.4826 * MAD(s), an outlier rule (Z = 6) that the
   few duplicated identities do not move. Planted duplicates sit far above it; distinct
   identities reach it only in the far tail of their nearest-neighbour cosine.
4. Faces closer to another identity's center than to their own: a second sequential pass over
   all faces, each compared with its own center without itself (leave one out, mean features
   only) and with the k nearest other centers of its identity. The cost is one read of the file
   plus N (k + 1) d products: at 42M faces, 2M identities and k = 8, a few minutes on a CPU and
   the read alone on a GPU, where searching all 2M centers for every face would be 21 times the
   center search. A face whose nearest foreign center is not among its identity's k nearest
   centers is mislabelled noise, not a conflict of two identities, and is not searched for.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from .centers import identity_centers, leave_one_out
from .neighbours import nearest

Z = 6.0         # outlier rule of the default threshold, in robust standard deviations
NEIGHBOURS = 8  # k: other centers kept per center (pairs and the faces check)
JSON_ROWS = 1000  # rows of each table listed in the JSON summary (the CSV files hold all)


@dataclass
class Conflicts:
    """Pairs (positions into ``ids``, cosine descending), the threshold, flagged faces."""
    ids: np.ndarray
    counts: np.ndarray
    pairs: np.ndarray            # P x 2 positions into ids, ids[pairs[:, 0]] < ids[pairs[:, 1]]
    cosines: np.ndarray          # P
    threshold: float
    rule: dict
    search: dict
    nearest_other: np.ndarray    # s_y per identity
    face_rows: np.ndarray = None     # flagged face rows
    face_other: np.ndarray = None    # position of the nearer foreign center
    face_own_cos: np.ndarray = None
    face_other_cos: np.ndarray = None
    timings: dict = field(default_factory=dict)

    def label_pairs(self):
        return [(int(self.ids[a]), int(self.ids[b]), float(c)) for (a, b), c in zip(self.pairs, self.cosines)]


def default_threshold(nearest_other, z=Z):
    """T = median(s) + z * 1.4826 * MAD(s), at most 1, over the nearest-other-center cosines s."""
    s = np.asarray(nearest_other, np.float64)
    med = float(np.median(s))
    # a floor for sets too small or too uniform to have a spread (MAD 0 would pair half the identities)
    sigma = max(1.4826 * float(np.median(np.abs(s - med))), 1e-3)
    t = min(1.0, med + z * sigma)
    return t, {"rule": f"median + {z:g} * 1.4826 * MAD of each center's nearest-other-center cosine",
               "median": med, "robust_sigma": sigma, "z": z}


def find_conflicts(features, labels, *, threshold=None, centers=None, k=NEIGHBOURS, faces=True,
                   device="cpu", method=None, nlist=None, nprobe=None, seed=0, chunk_rows=1 << 16,
                   progress=False, log=None):
    """Conflicting identity pairs and, with ``faces``, the faces nearer a foreign center.

    Args:
        features: N x d rows (a memory-mapped float16 ``features.npy`` is read sequentially).
        labels: N identity labels y_i.
        threshold: T, a cosine; pairs with cos(C_a, C_b) > T conflict. None: from the data.
        centers: optional num_classes x d centers instead of the mean features.
        k: other centers searched per center.
    """
    log = log or (lambda line: None)
    t0 = time.perf_counter()
    ids, C, counts, norms = identity_centers(features, labels, centers=centers, chunk_rows=chunk_rows,
                                             progress=progress, norms=True)
    if len(ids) < 2:
        raise ValueError(f"the features hold {len(ids)} identity; conflicts need at least two")
    timings = {"centers_s": time.perf_counter() - t0}
    log(f"{len(ids)} identity centers in {timings['centers_s']:.1f} s")
    k = min(k, len(ids) - 1)
    S, I, info = nearest(C, C, k + 1, device=device, method=method, nlist=nlist, nprobe=nprobe, seed=seed,
                         progress=progress)
    timings.update({name: info.pop(name) for name in ("train_add_s", "search_s") if name in info})
    S, I = _others(S, I, k)
    log(f"{info['method']} search of {k} nearest centers in "
        f"{timings.get('train_add_s', 0) + timings.get('search_s', 0):.1f} s")
    s = np.where(I[:, 0] >= 0, S[:, 0], -1.0).astype(np.float32)
    if threshold is None:
        threshold, rule = default_threshold(s)
    else:
        rule = {"rule": "given"}
    a = np.repeat(np.arange(len(ids)), k).reshape(len(ids), k)
    hit = (S > threshold) & (I >= 0)
    pa, pb, pc = a[hit], I[hit], S[hit]
    lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
    pairs, first = np.unique(np.stack([lo, hi], 1), axis=0, return_index=True)
    cos = pc[first] if len(pc) else np.zeros(0, np.float32)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -cos)) if len(cos) else np.zeros(0, np.int64)
    out = Conflicts(ids, counts, pairs.reshape(-1, 2)[order], cos[order], float(threshold), rule,
                    dict(info, k=k), s, timings=timings)
    if faces:
        t0 = time.perf_counter()
        _flag_faces(out, features, labels, C, norms if centers is None else None, I, device, chunk_rows, progress)
        timings["faces_s"] = time.perf_counter() - t0
        log(f"{len(out.face_rows)} faces nearer another identity's center, in {timings['faces_s']:.1f} s")
    return out


def find_identity_conflicts(features, labels, threshold=None, centers=None):
    """``[(label_a, label_b, cosine)]``, label_a < label_b, by cosine descending: identities whose
    centers (normalised mean features, or rows of ``centers``) are nearer than ``threshold``
    (None: median + 6 robust standard deviations of the nearest-other-center cosine)."""
    return find_conflicts(features, labels, threshold=threshold, centers=centers, faces=False).label_pairs()


def _others(S, I, k):
    """The k nearest centers other than the query itself (its own row is dropped wherever it stands)."""
    own = I == np.arange(len(I))[:, None]
    # rows missing themselves (an IVF cell boundary tie) lose their last neighbour instead
    drop = own | (~own.any(1, keepdims=True) & (np.arange(I.shape[1]) == I.shape[1] - 1))
    keep = ~drop
    return S[keep].reshape(len(S), k), I[keep].reshape(len(I), k)


def _flag_faces(out, features, labels, C, norms, I, device, chunk_rows, progress):
    import torch
    dev = torch.device(device)
    Ct = torch.from_numpy(C).to(dev)
    cand = torch.from_numpy(np.ascontiguousarray(I)).to(dev)
    counts = torch.from_numpy(out.counts).to(dev)
    lengths = torch.from_numpy(norms).to(dev) if norms is not None else None
    pos = np.searchsorted(out.ids, np.asarray(labels, np.int64))
    found = []
    sub = max(1, (1 << 26) // (C.shape[1] * I.shape[1] * 4))  # a 64 MB gather of candidate centers
    steps = range(0, len(pos), chunk_rows)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="faces", unit="block", leave=False)
    for s in steps:
        block = torch.from_numpy(np.asarray(features[s:s + chunk_rows], np.float32)).to(dev)
        block = torch.nn.functional.normalize(block, dim=1)
        own_all = torch.from_numpy(pos[s:s + len(block)]).to(dev)
        for u in range(0, len(block), sub):
            f, own = block[u:u + sub], own_all[u:u + sub]
            dot = (f * Ct[own]).sum(1)
            if lengths is not None:
                # cos(f, S - f) with S = |S| C the identity's sum of unit rows
                own_cos = leave_one_out(dot, lengths[own])
                own_cos = torch.where(counts[own] > 1, own_cos, torch.full_like(own_cos, float("inf")))
            else:
                own_cos = dot
            c = cand[own]
            other = torch.bmm(Ct[c.clamp(min=0)], f[:, :, None])[:, :, 0]
            other = torch.where(c >= 0, other, torch.full_like(other, -float("inf")))
            best, arg = other.max(1)
            hit = torch.nonzero(best > own_cos)[:, 0]
            if len(hit):
                found.append((hit.cpu().numpy() + s + u, c[hit, arg[hit]].cpu().numpy(),
                              own_cos[hit].cpu().numpy(), best[hit].cpu().numpy()))
    cols = [np.concatenate(x) for x in zip(*found)] if found else \
        [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)]
    out.face_rows, out.face_other, out.face_own_cos, out.face_other_cos = cols


def conflict_outputs(out):
    """The files ``conflicts --out`` writes: the JSON summary and two CSV tables beside it."""
    stem = out[:-5] if out.endswith(".json") else out
    return [out, f"{stem}_pairs.csv", f"{stem}_faces.csv"]


def dropped_rows(res, labels, mode):
    """Rows ``--drop`` removes: every face of the smaller identity of each pair (the larger label on
    a tie) for ``identity``, the flagged faces for ``faces``."""
    labels = np.asarray(labels, np.int64)
    if mode == "faces":
        return np.unique(res.face_rows)
    a, b = res.pairs[:, 0], res.pairs[:, 1]
    smaller = np.where(res.counts[b] <= res.counts[a], b, a)
    return np.flatnonzero(np.isin(labels, res.ids[np.unique(smaller)]))


def write_conflicts(out, res, labels, keys, offsets, *, drop=None, drop_mode="identity", extra=None):
    """Writes the JSON summary, ``<stem>_pairs.csv``, ``<stem>_faces.csv`` and, with ``drop``, a
    filtered set without the dropped records (``keys``/``offsets``: the image records, one per
    feature row; ``offsets`` may be the :mod:`.datasets` object, which writes its own kind of set), as one
    set. Returns the summary."""
    import csv
    import json
    import os

    from .files import output_set
    from .recordio_index import write_idx
    from .report import index_summary
    labels = np.asarray(labels, np.int64)
    keys = np.asarray(keys, np.int64)
    la, lb = res.ids[res.pairs[:, 0]], res.ids[res.pairs[:, 1]]
    na, nb = res.counts[res.pairs[:, 0]], res.counts[res.pairs[:, 1]]
    pairs = [{"label_a": int(x), "label_b": int(y), "size_a": int(m), "size_b": int(n), "cosine": round(float(c), 6)}
             for x, y, m, n, c in zip(la, lb, na, nb, res.cosines)]
    rows = res.face_rows if res.face_rows is not None else np.zeros(0, np.int64)
    faces = [{"key": int(keys[r]), "label": int(labels[r]), "other_label": int(res.ids[o]),
              "cosine_own": round(float(c0), 6), "cosine_other": round(float(c1), 6)}
             for r, o, c0, c1 in zip(rows, res.face_other, res.face_own_cos, res.face_other_cos)] if len(rows) else []
    s = res.nearest_other
    info = dict(extra or {})
    info.update({
        "faces": int(len(labels)), "identities": int(len(res.ids)), "pairs": len(pairs),
        "identities_in_pairs": int(len(np.unique(res.pairs))), "flagged_faces": len(faces),
        "threshold": res.threshold, "threshold_rule": res.rule, "search": res.search,
        "nearest_other_cosine_quantiles": {q: float(np.quantile(s, float(q))) for q in ("0.5", "0.9", "0.99", "0.999")},
        "timings_s": {name: round(v, 3) for name, v in res.timings.items()},
    })
    paths = conflict_outputs(out) + ([drop, os.path.splitext(drop)[0] + ".json"] if drop else [])
    with output_set(paths) as tmps:
        if drop:
            gone = dropped_rows(res, labels, drop_mode)
            keep = np.setdiff1d(np.arange(len(labels)), gone)
            if hasattr(offsets, "write_subset"):
                offsets.write_subset(tmps[3], keep)
            else:
                write_idx(tmps[3], keys[keep], np.asarray(offsets)[keep])
            info["drop"] = {"index": drop, "mode": drop_mode, "dropped_faces": int(len(gone)),
                            "kept_faces": int(len(keep)),
                            "dropped_identities": int(len(np.setdiff1d(labels[gone], labels[keep])))}
            mask = np.zeros(len(labels), bool)
            mask[keep] = True
            # the summary the training filter checks the index against config.rec with
            with open(tmps[4], "w") as f:
                json.dump(index_summary(labels, mask, keys, info.get("dataset"), method=f"conflicts drop ({drop_mode})",
                                        conflicts_report=os.path.abspath(out), **info["drop"]), f, indent=1)
        # the JSON lists the first rows (most similar first); the CSV tables hold them all
        info["pairs_list"] = pairs[:JSON_ROWS]
        info["flagged_faces_list"] = faces[:JSON_ROWS]
        info["listed_rows"] = f"at most {JSON_ROWS} of each table; every row is in the CSV files"
        with open(tmps[0], "w") as f:
            json.dump(info, f, indent=1)
        for path, table in ((tmps[1], pairs), (tmps[2], faces)):
            with open(path, "w", newline="") as f:
                names = list(table[0]) if table else (["label_a", "label_b", "size_a", "size_b", "cosine"]
                                                      if path == tmps[1] else
                                                      ["key", "label", "other_label", "cosine_own", "cosine_other"])
                w = csv.DictWriter(f, names)
                w.writeheader()
                w.writerows(table)
    return info
