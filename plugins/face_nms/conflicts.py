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
from .neighbours import EXACT_PAIRS, nearest

Z = 6.0         # outlier rule of the default threshold, in robust standard deviations
NEIGHBOURS = 8  # k: other centers kept per center (pairs and the faces check)
JSON_ROWS = 1000  # rows of each table listed in the JSON summary (the CSV files hold all)
# centers whose IVF probes found fewer than k others are searched again exactly while
# (such centers) x (all centers) stays under this many products
SEARCH_AGAIN_PAIRS = EXACT_PAIRS


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
    warnings: list = field(default_factory=list)  # one line each: a search or threshold that could not do its job

    def label_pairs(self):
        return [(int(self.ids[a]), int(self.ids[b]), float(c)) for (a, b), c in zip(self.pairs, self.cosines)]


EDGE = 1e-3  # a default threshold this near -1 or 1 (or past them) decides nothing


def default_threshold(nearest_other, z=Z):
    """T = median(s) + z * 1.4826 * MAD(s), at most 1, over the nearest-other-center cosines s that were
    found (NaN: a center whose search found no other center counts in neither the median nor the MAD)."""
    s = np.asarray(nearest_other, np.float64)
    s = s[np.isfinite(s)]
    med = float(np.median(s))
    # a floor for sets too small or too uniform to have a spread (MAD 0 would pair half the identities)
    sigma = max(1.4826 * float(np.median(np.abs(s - med))), 1e-3)
    t = min(1.0, med + z * sigma)
    return t, {"rule": f"median + {z:g} * 1.4826 * MAD of each center's nearest-other-center cosine",
               "median": med, "robust_sigma": sigma, "z": z, "identities_counted": int(len(s))}


def threshold_warning(t, rule, n_ids):
    """A line when the default threshold lies at an end of [-1, 1], where it separates nothing."""
    raw = rule["median"] + rule["z"] * rule["robust_sigma"]
    if -1 + EDGE < raw < 1 - EDGE:
        return None
    return (f"the default threshold reaches {t:.4f} (median {rule['median']:.4f} + {rule['z']:g} x robust sigma "
            f"{rule['robust_sigma']:.4f} = {raw:.4f}): on {n_ids} identities the nearest-other-center cosines do not "
            f"single out outliers, so " + ("no pair can exceed it" if raw > 0 else "every pair exceeds it") +
            "; give --threshold")


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
    warnings = []
    short = np.flatnonzero((I < 0).any(axis=1))  # the IVF probes held fewer than k other centers
    if len(short) and len(short) * len(ids) <= SEARCH_AGAIN_PAIRS:
        S2, I2, _ = nearest(C[short], C, k + 1, device=device, method="exact")
        S[short], I[short] = _others(S2, I2, k, own=short)
        info["searched_again_exactly"] = int(len(short))
        log(f"{len(short)} centers whose IVF probes held fewer than {k} others searched again exactly")
    elif len(short):
        missed = int((I[:, 0] < 0).sum())
        warnings.append(f"{missed} of {len(ids)} identity centers found no other center in their IVF probes (nprobe "
                        f"{info.get('nprobe')} of nlist {info.get('nlist')}), and {len(short)} fewer than the {k} "
                        f"asked: only the centers found count, in the threshold and in the pairs; raise --nprobe or "
                        f"use --method exact")
    s = np.where(I[:, 0] >= 0, S[:, 0], np.nan).astype(np.float32)
    if threshold is None:
        if not np.isfinite(s).any():
            raise ValueError(f"no identity center found another center in its IVF probes (nprobe {info.get('nprobe')} "
                             f"of nlist {info.get('nlist')}); raise --nprobe, use --method exact or give --threshold")
        threshold, rule = default_threshold(s)
        line = threshold_warning(threshold, rule, len(ids))
        if line:
            warnings.append(line)
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
                    dict(info, k=k), s, timings=timings, warnings=warnings)
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


def _others(S, I, k, own=None):
    """The k nearest centers other than the query itself (its own row, ``own`` or the query's position,
    is dropped wherever it stands)."""
    own = I == (np.arange(len(I)) if own is None else np.asarray(own))[:, None]
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
    """The files ``conflicts --out`` writes: the JSON summary, two CSV tables and the page beside it."""
    stem = out[:-5] if out.endswith(".json") else out
    return [out, f"{stem}_pairs.csv", f"{stem}_faces.csv", f"{stem}.html"]


def dropped_rows(res, labels, mode):
    """Rows ``--drop`` removes: every face of the smaller identity of each pair (the larger label on
    a tie) for ``identity``, the flagged faces for ``faces``."""
    labels = np.asarray(labels, np.int64)
    if mode == "faces":
        return np.unique(res.face_rows)
    a, b = res.pairs[:, 0], res.pairs[:, 1]
    smaller = np.where(res.counts[b] <= res.counts[a], b, a)
    return np.flatnonzero(np.isin(labels, res.ids[np.unique(smaller)]))


def write_conflicts(out, res, labels, keys, offsets, *, drop=None, drop_mode="identity", extra=None, page=None):
    """Writes the JSON summary, ``<stem>_pairs.csv``, ``<stem>_faces.csv``, with ``page`` the page
    ``<stem>.html`` (``page(path, info, pairs, faces)``, :mod:`.conflicts_page`) and, with ``drop``,
    a filtered set without the dropped records (``keys``/``offsets``: the image records, one per
    feature row; ``offsets`` may be the :mod:`.datasets` object, which writes its own kind of set), as
    one set. Returns the summary."""
    import csv
    import json
    import os

    from .files import left_of_family, output_set
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
        "nearest_other_cosine_quantiles": {q: float(np.nanquantile(s, float(q))) if np.isfinite(s).any() else None
                                           for q in ("0.5", "0.9", "0.99", "0.999")},
        "timings_s": {name: round(v, 3) for name, v in res.timings.items()},
    })
    warnings = list(res.warnings)
    if drop:
        gone = dropped_rows(res, labels, drop_mode)
        keep = np.setdiff1d(np.arange(len(labels)), gone)
        if not len(keep):
            raise ValueError(f"--drop {drop}: the {drop_mode} drop removes every one of the {len(labels)} faces, so "
                             f"the index would be empty; check --threshold ({res.threshold:.4f}), --centers and the "
                             f"model")
        if not len(gone):
            what = "conflicting pair" if drop_mode == "identity" else "face nearer another identity's center"
            warnings.append(f"--drop {drop} drops nothing (no {what} at threshold {res.threshold:.4f}): the index "
                            f"lists every face of the dataset")
    info["warnings"] = warnings
    tables = conflict_outputs(out)[:3 if page is None else 4]
    paths = tables + ([drop, os.path.splitext(drop)[0] + ".json"] if drop else [])
    # a drop index replaces the whole set of an earlier index of that name: its plots and page go
    with output_set(paths, [""] * 3 + [".html"] * (page is not None) + [""] * (len(paths) - len(tables)),
                    remove=left_of_family(drop, paths) if drop else ()) as tmps:
        tmp_json, tmp_pairs, tmp_faces = tmps[:3]
        tmp_drop, tmp_drop_summary = tmps[len(tables):] if drop else (None, None)
        if drop:
            if hasattr(offsets, "write_subset"):
                offsets.write_subset(tmp_drop, keep)
            else:
                write_idx(tmp_drop, keys[keep], np.asarray(offsets)[keep])
            info["drop"] = {"index": drop, "mode": drop_mode, "dropped_faces": int(len(gone)),
                            "kept_faces": int(len(keep)),
                            "dropped_identities": int(len(np.setdiff1d(labels[gone], labels[keep])))}
            mask = np.zeros(len(labels), bool)
            mask[keep] = True
            # the summary the training filter checks the index against config.rec with
            with open(tmp_drop_summary, "w") as f:
                json.dump(index_summary(labels, mask, keys, info.get("dataset"), method=f"conflicts drop ({drop_mode})",
                                        conflicts_report=os.path.abspath(out), **info["drop"]), f, indent=1)
        # the JSON lists the first rows (most similar first); the CSV tables hold them all
        info["pairs_list"] = pairs[:JSON_ROWS]
        info["flagged_faces_list"] = faces[:JSON_ROWS]
        info["listed_rows"] = f"at most {JSON_ROWS} of each table; every row is in the CSV files"
        with open(tmp_json, "w") as f:
            json.dump(info, f, indent=1)
        for path, table in ((tmp_pairs, pairs), (tmp_faces, faces)):
            with open(path, "w", newline="") as f:
                columns = list(table[0]) if table else (["label_a", "label_b", "size_a", "size_b", "cosine"]
                                                      if path == tmp_pairs else
                                                      ["key", "label", "other_label", "cosine_own", "cosine_other"])
                w = csv.DictWriter(f, columns)
                w.writeheader()
                w.writerows(table)
        if page is not None:
            page(tmps[3], info, pairs, faces)
    return info
