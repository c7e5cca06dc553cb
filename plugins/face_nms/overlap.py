"""Benchmark overlap: training identities that also appear in evaluation sets (LFW, CFP-FP, AgeDB).

An evaluation face x matches training identity y when cos(x, c_y) >= t, c_y the identity's
center (the normalised mean of its features, :func:`centers.identity_centers`); the k nearest
centers of each face are searched exactly (:func:`neighbours.nearest`: on the CPU blocked
bfloat16 products re-scored in float32 once the search is large, on a GPU fp16 products), so an
identity packed under two labels is found under both. Exact because the search is one-sided (an
evaluation face against all centers, at cosines well below those of duplicated identities),
where an inverted file's probe lists miss too much, and small: the evaluation sets hold tens of
thousands of faces.

Default threshold: a robust equal-error point of two cosine distributions the training set
gives for the model at hand, on a sample of its faces:

* genuine: a face to the center of its own identity computed without it (leave-one-out, so a
  face of a small identity does not count itself): what an unseen photo of a training
  identity, such as an evaluation face, scores against its identity;
* impostor: a face to the nearest center of another identity: what a face of a person absent
  from training scores against the nearest of all training centers.

Each is summarised by its median and spread (1.4826 MAD), and t lies as many spreads above
the impostor median as below the genuine one. It follows the model (a weak proxy model brings
the two together, a strong one moves them apart) and needs no constant tuned to one network.
Medians and MADs, unlike an empirical equal-error point or a tail quantile of the impostor
cosines, are not moved by the identities that web-crawled sets hold twice under two labels
(their faces' nearest "other" center is the same person, a genuine cosine counted as an
impostor): with 2% of such faces an empirical equal-error point rises into the genuine range
and misses half the overlap. Evaluation photos usually score lower against their training
identity than training faces do (other cameras and ages), which a threshold halfway in spreads
leaves room for. The report gives both medians and spreads and the empirical rates at t.
"""
from dataclasses import dataclass, field

import numpy as np

from .centers import identity_centers, leave_one_out
from .neighbours import nearest

NEIGHBOURS = 5  # k: centers kept per evaluation face
EDGE = 1e-3  # a default threshold this near -1 or 1 matches every face or none
SAMPLE = 20_000  # training faces that estimate the default threshold (medians and MADs)


@dataclass
class Overlap:
    """Matches of evaluation faces to training identities.

    ``sets[j]``: for evaluation set j, (eval row, training label, cosine) arrays of every match.
    """
    threshold: float
    threshold_rule: dict
    search: dict
    sets: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # one line each: a threshold that cannot separate

    def labels(self):
        """Sorted unique training labels matched in any set."""
        found = [s[1] for s in self.sets]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def find_overlap(train_features, train_labels, eval_features, threshold=None, **kw):
    """Sorted unique training labels y with cos(x, c_y) >= ``threshold`` (t) for some evaluation face x.

    Args:
        train_features: N x d training features (rows of ``features.npy``), labels ``train_labels``.
        eval_features: M x d evaluation features of the same model.
        threshold: t, a cosine in [-1, 1]; None: the robust equal-error point of the training set (module doc).
        kw: ``k``, ``device``, ``method``, ``sample``, ``seed`` of :func:`search_overlap`.
    """
    return search_overlap(train_features, train_labels, [eval_features], threshold, **kw).labels()


def search_overlap(train_features, train_labels, eval_sets, threshold=None, *, k=NEIGHBOURS, device="cpu",
                   method="exact", sample=SAMPLE, seed=0, centers=None, log=None):
    """Overlap of every evaluation set (a list of M_j x d arrays) with the training identities.

    One search covers the evaluation faces and the training sample of the default threshold.
    ``centers``: (ids, C, counts, |S|) of :func:`identity_centers` with ``norms=True``, if known.
    """
    labels = np.asarray(train_labels, np.int64)
    ids, C, counts, lengths = centers if centers is not None else identity_centers(train_features, labels,
                                                                                    norms=True)
    d = C.shape[1]
    evals = []
    for j, e in enumerate(eval_sets):
        e = np.asarray(e, np.float32)
        if e.ndim != 2 or e.shape[1] != d:
            raise ValueError(f"evaluation set {j} has shape {e.shape}; the training features are {d}-dimensional")
        evals.append(_unit(e))
    if threshold is not None and not (np.isfinite(threshold) and -1 <= threshold <= 1):
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold!r}")
    rows = np.zeros(0, np.int64)
    if threshold is None:
        if len(ids) < 2:
            raise ValueError("the training features hold one identity, so no impostor cosine to derive a threshold "
                             "from; give the threshold")
        rows = np.sort(np.random.default_rng(seed).choice(len(labels), min(sample, len(labels)), replace=False))
    queries = np.concatenate([_unit(np.asarray(train_features[rows], np.float32)).reshape(-1, d)] + evals)
    kk = max(2, min(int(k), len(ids)))
    S, I, info = nearest(queries, C, kk, device=device, method=method, seed=seed)
    rule = {"rule": "given"}
    if threshold is None:
        pos = np.searchsorted(ids, labels[rows])
        genuine = _leave_one_out(train_features, C, counts, lengths, rows, pos)
        impostor = _nearest_other(S[:len(rows)], I[:len(rows)], pos)
        threshold, rule = equal_error_threshold(genuine, impostor)
    result = Overlap(float(threshold), rule, dict(info, k=kk))
    if rule["rule"] != "given" and not -1 + EDGE < threshold < 1 - EDGE:
        result.warnings.append(
            f"the default threshold is {threshold:.4f}, at the end of [-1, 1] (genuine and impostor medians "
            f"{rule['genuine_median']:.4f} and {rule['impostor_median']:.4f}): the model gives every training face "
            f"nearly one feature, so the overlap " + ("holds no identity or only copies" if threshold > 0 else
                                                      "holds every identity") +
            "; check the model, or give --threshold")
    elif rule["rule"] != "given" and rule["separation"] < 2:
        result.warnings.append(
            f"the model separates the training identities poorly: the genuine and impostor medians "
            f"({rule['genuine_median']:.3f} and {rule['impostor_median']:.3f}) lie only {rule['separation']:.1f} "
            f"robust spreads from the threshold {threshold:.4f}; expect missed overlap and false matches: use a "
            f"better-trained proxy model, or give --threshold")
    start = len(rows)
    for e in evals:
        s, i = S[start:start + len(e)], I[start:start + len(e)]
        hit = (s >= threshold) & (i >= 0)
        r, c = np.nonzero(hit)
        result.sets.append((r.astype(np.int64), ids[i[r, c]].astype(np.int64), s[r, c].astype(np.float32)))
        start += len(e)
    return result


def equal_error_threshold(genuine, impostor):
    """(t, report): the robust equal-error point of two cosine samples.

    Each is summarised by its median m and spread s = 1.4826 MAD (sigma for a normal sample), and t
    lies as many spreads above the impostor median as below the genuine one:
    (t - m_imp) / s_imp = (m_gen - t) / s_gen. Medians and MADs ignore the few percent of faces whose
    nearest other identity is the same person under a second label, which would drag an empirical
    equal-error point or an impostor tail quantile up into the genuine range.
    """
    genuine, impostor = np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)
    if not len(genuine) or not len(impostor):
        raise ValueError(f"no {'genuine' if not len(genuine) else 'impostor'} cosine in the training sample (every "
                         f"identity has one face, or there is one identity): give the threshold")
    mg, mi = np.median(genuine), np.median(impostor)
    sg, si = (max(1.4826 * np.median(np.abs(x - m)), 1e-6) for x, m in ((genuine, mg), (impostor, mi)))
    t = float(np.float32(np.clip((mi * sg + mg * si) / (sg + si), -1, 1)))
    q = (0.01, 0.5, 0.99)
    return t, {"rule": "robust equal-error point of the training set's genuine cosines (a face to its own identity's "
                       "center without it) and impostor cosines (a face to the nearest other center): "
                       "(t - median_imp) / spread_imp = (median_gen - t) / spread_gen, spread = 1.4826 MAD",
               "separation": float((mg - mi) / (sg + si)),
               "sample_genuine": int(len(genuine)), "sample_impostor": int(len(impostor)),
               "genuine_median": float(mg), "genuine_spread": float(sg),
               "impostor_median": float(mi), "impostor_spread": float(si),
               "false_match_rate": float(np.mean(impostor >= t)), "false_non_match_rate": float(np.mean(genuine < t)),
               "genuine_quantiles": {str(p): float(np.quantile(genuine, p)) for p in q},
               "impostor_quantiles": {str(p): float(np.quantile(impostor, p)) for p in q}}


def _leave_one_out(features, C, counts, lengths, rows, pos):
    """cos(f_i, center of its identity without f_i) for the sampled ``rows`` of identities of >= 2 faces.

    With S the sum of the identity's unit features (|S| from the centers pass) and g = cos(f_i, S/|S|):
    cos(f_i, S - f_i) = (|S| g - 1) / sqrt(|S|^2 - 2 |S| g + 1).
    """
    f = _unit(np.asarray(features[rows], np.float32))
    g = np.einsum("nd,nd->n", f, C[pos]).astype(np.float64)
    n = lengths[pos].astype(np.float64)
    keep = counts[pos] >= 2
    return np.clip(leave_one_out(g, n)[keep], -1, 1)


def _nearest_other(S, I, pos):
    """Cosine of each sampled face to the nearest center that is not its own identity's."""
    other = (I != pos[:, None]) & (I >= 0)
    first = np.argmax(other, axis=1)
    found = other[np.arange(len(S)), first]
    return S[np.arange(len(S)), first][found]


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---- the command: features + evaluation .bin files -> report (+ exclusion index) ----

def check_same_model(feature_dir, meta, given, model_path):
    """Refuses a model other than the one the features were extracted with."""
    recorded = (meta.get("provenance") or {}).get("model")
    if recorded is None:
        raise ValueError(f"{feature_dir}/meta.json records no model provenance, so the model cannot be checked; "
                         f"extract the features again")
    if recorded != given:
        raise ValueError(f"model mismatch: the features in {feature_dir} were extracted with {_describe(recorded)}, "
                         f"but {model_path} is {_describe(given)}; pass the model the features came from, or extract "
                         f"features with this one")


def _describe(origin):
    if not isinstance(origin, dict):
        return repr(origin)
    if "onnx_sha256" in origin:
        return f"ONNX model sha256 {str(origin['onnx_sha256'])[:12]}"
    if "checkpoint_sha256" in origin:
        return (f"checkpoint sha256 {str(origin['checkpoint_sha256'])[:12]} (network {origin.get('network')}, "
                f"embedding size {origin.get('embedding_size')})")
    return ", ".join(f"{k} {str(v)[:12]}" for k, v in sorted(origin.items()))


def embed(model, eval_bin, flip, batch_size=256):
    """Unit features (float32) of every image of an EvalBin, as extract computes training features."""
    import torch

    from .eval_bin import batches
    out = [np.asarray(model(torch.from_numpy(images), flip), np.float32) for _, images in batches(eval_bin, batch_size)]
    feats = np.concatenate(out)
    if not np.all(np.isfinite(feats)):
        raise FloatingPointError(f"the model gave non-finite features for images of {eval_bin.path}; check the model")
    return feats


def run_overlap(feature_dir, rec_dir, bin_paths, out, *, checkpoint=None, network=None, embedding_size=512,
                onnx=None, exclude=None, threshold=None, device="cpu", batch_size=256, log=print, page_rows=200):
    """Writes the overlap report ``out``, its page ``<stem>.html`` (``page_rows`` matched identities
    per .bin, :mod:`.overlap_page`) and the exclusion index ``exclude``; returns the report."""
    import os

    from .datasets import open_dataset
    from .eval_bin import read_bin
    from .features import load_features
    from .models import load_model, model_origin
    ds = open_dataset(rec_dir)
    feats, labels, _, meta = load_features(feature_dir, ds)
    check_same_model(feature_dir, meta, model_origin(checkpoint, network, embedding_size, onnx), checkpoint or onnx)
    bins = [read_bin(p) for p in bin_paths]
    model = load_model(checkpoint, network, embedding_size, onnx, device)
    flip = bool(meta["flip"])
    evals = [embed(model, b, flip, batch_size) for b in bins]
    centers = identity_centers(feats, labels, norms=True)
    result = search_overlap(feats, labels, evals, threshold, device=device, centers=centers,
                            log=lambda line: log(f"face_nms overlap: {line}"))
    found = result.labels()
    report = {"threshold": result.threshold, "threshold_rule": result.threshold_rule, "search": result.search,
              "features": os.path.abspath(feature_dir), "model": meta["provenance"]["model"], "flip": flip,
              "dataset": meta["provenance"].get("dataset"), "bins": []}
    for b, (rows, labs, cos) in zip(bins, result.sets):
        per = []
        for lab in np.unique(labs):
            m = labs == lab
            per.append({"label": int(lab), "cosine": round(float(cos[m].max()), 6),
                        "image_indices": sorted(set(rows[m].tolist()))})
        report["bins"].append({"bin": os.path.abspath(b.path), "images": len(b), "pairs": len(b.issame),
                               "matched_images": int(len(np.unique(rows))), "identities": per})
    sizes = dict(zip(centers[0].tolist(), centers[2].tolist()))
    report["totals"] = {"identities": len(found), "labels": found.tolist(),
                        "training_faces_of_them": int(sum(sizes[int(y)] for y in found)),
                        "training_identities": len(centers[0]), "training_faces": int(len(labels)),
                        "matched_images": sum(e["matched_images"] for e in report["bins"]),
                        "evaluation_images": sum(e["images"] for e in report["bins"])}
    report["exclusion"] = None
    report["warnings"] = list(result.warnings)
    paths = [out]
    if exclude:
        report["exclusion"], summary, rows = _exclusion(exclude, ds, labels, found, meta, out)
        if not len(found):
            report["warnings"].append(f"the exclusion index {exclude} lists every training face: no training "
                                      f"identity matches an evaluation image at threshold {result.threshold:.4f}")
        from .files import same_file
        paths += [exclude] + ([] if same_file(summary["path"], out) else [summary["path"]])
    for line in report["warnings"]:
        log(f"face_nms overlap: warning: {line}")

    def page(path):
        from .overlap_page import overlap_page
        with open(path, "w", encoding="utf-8") as f:
            f.write(overlap_page(f"Benchmark overlap: {os.path.basename(out)}", report, bins, result.sets, labels,
                                 ds.keys, ds, rows=page_rows))
    paths.append(overlap_outputs(out)[1])
    _write(paths, report, summary if exclude else None, rows if exclude else None, ds, page)
    return report


def overlap_outputs(out):
    """The report ``--out`` and its page ``<stem>.html``."""
    import os
    return [out, os.path.splitext(out)[0] + ".html"]


def _exclusion(exclude, ds, labels, found, meta, out):
    """The training rows of identities outside the overlap, with the summary the training filter reads."""
    import os

    from .report import index_summary
    keep = ~np.isin(labels, found)
    identities = len(np.unique(labels))
    if not keep.any():
        raise ValueError(f"--exclude {exclude}: the overlap holds every one of the {identities} training identities, "
                         f"so the exclusion index would be empty; check --threshold and the model")
    keys = ds.keys  # load_features checked these are the feature rows, in order
    summary = index_summary(labels, keep, keys, meta["provenance"]["dataset"], method="overlap exclusion",
                            identities=identities, removed_identities=int(len(found)),
                            removed_faces=int((~keep).sum()), overlap_report=os.path.abspath(out))
    summary["path"] = os.path.splitext(exclude)[0] + ".json"
    info = {k: summary[k] for k in ("kept", "total", "removed_identities", "removed_faces")}
    info["index"] = os.path.abspath(exclude)
    return info, summary, np.flatnonzero(keep)


def _write(paths, report, summary, rows, ds, page):
    """``paths``: the report, [the index, [its summary]], the page (last)."""
    import json

    from .files import left_of_family, output_set
    # an exclusion index replaces the whole set of an earlier index of that name: its plots and page go
    with output_set(paths, [""] * (len(paths) - 1) + [".html"],
                    remove=left_of_family(paths[1], paths) if len(paths) > 2 else ()) as tmps:
        body = dict(report)
        page(tmps[-1])
        if summary is not None:
            ds.write_subset(tmps[1], rows)
            extra = {k: v for k, v in summary.items() if k != "path"}
            if len(paths) == 4:
                with open(tmps[2], "w") as f:
                    json.dump(extra, f, indent=1)
            else:  # the index's summary is the report itself: the filter reads its dataset and counts
                body.update({k: v for k, v in extra.items() if k not in body or k == "dataset"})
        with open(tmps[0], "w") as f:
            json.dump(body, f, indent=1)
