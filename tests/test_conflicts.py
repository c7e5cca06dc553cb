import csv
import json
import os

import numpy as np
import pytest

from plugins.face_nms import find_identity_conflicts
from plugins.face_nms.__main__ import main
from plugins.face_nms.conflicts import find_conflicts
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import TorchModel, extract_features
from plugins.face_nms.recordio_index import image_records, read_idx

from test_cli import cli, one_line, snapshot


def planted(n_ids=1500, dup=60, d=512, seed=0, groups=20):
    """Faces around identity centers spread on the sphere (a little grouped, as faces of one
    population are), intra-identity cosine 0.5-0.8; ``dup`` identities split under a second label.
    Returns (float16 features, labels, set of planted (label_a, label_b))."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((groups, d))
    c = 0.5 * g[rng.integers(0, groups, n_ids)] + rng.standard_normal((n_ids, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    sizes = rng.integers(4, 30, n_ids)
    labels = np.repeat(np.arange(n_ids), sizes)
    a = np.sqrt(rng.uniform(0.5, 0.8, n_ids))[labels, None]  # cos(face, center): face pairs at a^2
    u = rng.standard_normal((len(labels), d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = a * c[labels] + np.sqrt(1 - a * a) * u
    split = rng.choice(n_ids, dup, replace=False)
    pairs = set()
    for j, y in enumerate(split):
        rows = np.flatnonzero(labels == y)
        moved = rng.permutation(rows)[:len(rows) // 2]
        labels[moved] = n_ids + j
        pairs.add((int(y), n_ids + j))
    order = rng.permutation(len(labels))  # im2rec-style shuffle
    return (x[order] / np.linalg.norm(x[order], axis=1, keepdims=True)).astype(np.float16), labels[order], pairs


def test_planted_duplicates_found_at_the_default_threshold():
    feats, labels, truth = planted()
    found = find_identity_conflicts(feats, labels)
    got = {(a, b) for a, b, _ in found}
    assert all(a < b for a, b, _ in found)
    assert [c for _, _, c in found] == sorted((c for _, _, c in found), reverse=True)
    recall = len(got & truth) / len(truth)
    precision = len(got & truth) / max(1, len(got))
    assert recall >= 0.95 and precision >= 0.90, (recall, precision, len(got))


def test_default_threshold_is_reported_and_separates():
    feats, labels, truth = planted(n_ids=800, dup=20, seed=1)
    res = find_conflicts(feats, labels, faces=False)
    med, sigma = res.rule["median"], res.rule["robust_sigma"]
    assert res.threshold == pytest.approx(med + 6 * sigma, abs=1e-6)
    assert np.median(res.nearest_other) == pytest.approx(med, abs=1e-6)
    planted_cos = [c for a, b, c in res.label_pairs() if (a, b) in truth]
    assert min(planted_cos) > res.threshold
    # a threshold given is used as is
    assert find_identity_conflicts(feats, labels, threshold=0.999) == []


def test_given_centers_replace_mean_features():
    feats, labels, truth = planted(n_ids=300, dup=10, seed=2)
    n = labels.max() + 1
    centers = np.random.default_rng(5).standard_normal((n, feats.shape[1])).astype(np.float32)
    a, b = sorted(truth)[0]
    centers[b] = centers[a] + 0.1 * centers[b]
    found = find_identity_conflicts(feats, labels, centers=centers)
    assert [(x, y) for x, y, _ in found] == [(a, b)]


def test_faces_nearer_another_center_are_flagged():
    feats, labels, truth = planted(n_ids=400, dup=10, seed=3)
    feats = feats.astype(np.float32)
    # one face of identity 0 replaced by a face of its nearest other identity's center
    res0 = find_conflicts(feats, labels, faces=True)
    assert all(labels[r] in {y for p in truth for y in p} for r in res0.face_rows[:0])
    ids = res0.ids
    row = int(np.flatnonzero(labels == 7)[0])
    pos7 = int(np.searchsorted(ids, 7))
    other = None
    from plugins.face_nms.centers import identity_centers
    _, C, _ = identity_centers(feats, labels)
    sims = C @ C[pos7]
    sims[pos7] = -2
    other = int(np.argmax(sims))
    feats[row] = C[other]
    res = find_conflicts(feats, labels, faces=True)
    i = list(res.face_rows).index(row)
    assert int(res.ids[res.face_other[i]]) == int(ids[other])
    assert res.face_other_cos[i] > res.face_own_cos[i]
    # faces of distinct, unsplit identities are not flagged
    split = {y for p in truth for y in p}
    assert {int(labels[r]) for r in res.face_rows} <= split | {7}
