import csv
import json
import os

import numpy as np
import pytest

from plugins.face_nms import find_identity_conflicts
from plugins.face_nms.conflicts import find_conflicts
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import extract_features
from plugins.face_nms.models import TorchModel
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
    split = {y for p in truth for y in p}
    assert 7 not in split and 7 not in {int(labels[r]) for r in res0.face_rows}
    ids = res0.ids
    row = int(np.flatnonzero(labels == 7)[0])
    pos7 = int(np.searchsorted(ids, 7))
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
    assert {int(labels[r]) for r in res.face_rows} <= split | {7}


# ---- the command on real RecordIO and a real extraction ----

@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """An im2rec set written by mxnet, identity 3 split under label 40, and its TinyNet features."""
    root = tmp_path_factory.mktemp("conflicts")
    images, labels, _ = synthetic_faces(n_ids=40, seed=0)
    labels[np.flatnonzero(labels == 3)[::2]] = 40
    rec = str(root / "ds")
    write_recordio(rec, images, labels, "im2rec", shuffle_seed=0)
    feats = extract_features(rec, str(root / "feats"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=64,
                             workers=0, progress=False)
    centers = str(root / "centers.npy")
    np.save(centers, np.random.default_rng(0).standard_normal((41, 128)).astype(np.float32))
    return {"root": str(root), "rec": rec, "feats": feats, "centers": centers, "labels": labels}


def conflicts(ds, out, *extra):
    return ["conflicts", "--features", ds["feats"], "--rec", ds["rec"], "--out", str(out), *extra]


@pytest.mark.parametrize("mode", ["identity", "faces"])
def test_cli_writes_json_csv_and_drop_index(ds, capsys, tmp_path, mode):
    out, drop = tmp_path / "c.json", tmp_path / "clean.idx"
    status, _ = cli(conflicts(ds, out, "--drop", str(drop), "--drop-mode", mode), capsys)
    assert status == 0
    info = json.load(open(out))
    assert [(p["label_a"], p["label_b"]) for p in info["pairs_list"]] == [(3, 40)]
    assert info["threshold_rule"]["z"] == 6 and info["search"]["method"] == "exact"
    labels = ds["labels"]
    assert info["pairs_list"][0]["size_a"] == (labels == 3).sum()
    rows = list(csv.DictReader(open(tmp_path / "c_pairs.csv")))
    assert [(int(r["label_a"]), int(r["label_b"])) for r in rows] == [(3, 40)]
    faces = list(csv.DictReader(open(tmp_path / "c_faces.csv")))
    assert len(faces) == info["flagged_faces"] == len(info["flagged_faces_list"])
    _, rec_keys, rec_offsets = image_records(ds["rec"])
    keys, offsets = read_idx(str(drop))
    label_of = dict(zip(np.load(os.path.join(ds["feats"], "keys.npy")).tolist(),
                        np.load(os.path.join(ds["feats"], "labels.npy")).tolist()))
    if mode == "identity":
        smaller = 3 if (labels == 3).sum() < (labels == 40).sum() else 40
        assert len(keys) == len(rec_keys) - (labels == smaller).sum()
        assert smaller not in {label_of[k] for k in keys.tolist()}
    else:
        flagged = {int(f["key"]) for f in faces}
        assert set(keys.tolist()) == set(rec_keys.tolist()) - flagged
    assert info["drop"]["kept_faces"] == len(keys)
    # its summary lets the training filter check it against the dataset
    from plugins.face_nms.filter import check_index_dataset
    summary = json.load(open(tmp_path / "clean.json"))
    assert summary["kept"] == len(keys) and summary["dataset"]["label_sample"]["keys"]
    check_index_dataset(str(drop), ds["rec"], keys)
    assert dict(zip(rec_keys.tolist(), rec_offsets.tolist())) | dict(zip(keys.tolist(), offsets.tolist())) == \
        dict(zip(rec_keys.tolist(), rec_offsets.tolist()))


def test_cli_given_threshold_and_centers(ds, capsys, tmp_path):
    out = tmp_path / "c.json"
    assert cli(conflicts(ds, out, "--threshold", "1"), capsys)[0] == 0
    info = json.load(open(out))
    assert info["pairs"] == 0 and info["threshold"] == 1.0 and info["threshold_rule"] == {"rule": "given"}
    assert cli(conflicts(ds, out, "--centers", ds["centers"]), capsys)[0] == 0
    assert json.load(open(out))["centers"] == ds["centers"]


def test_cli_bad_inputs_are_one_line(ds, capsys, tmp_path):
    data = {"rec": ds["rec"], "feats": ds["feats"], "centers": ds["centers"]}
    before = snapshot(data)
    out = tmp_path / "c.json"
    one_line(*cli(conflicts(ds, out, "--threshold", "1.5"), capsys), 2, "--threshold", "[-1, 1]")
    one_line(*cli(conflicts(ds, out, "--threshold", "-2"), capsys), 2, "--threshold")
    one_line(*cli(conflicts(ds, os.path.join(ds["rec"], "train.idx")), capsys), 2, "train.idx", "replace an input")
    one_line(*cli(conflicts(ds, os.path.join(ds["feats"], "meta.json")), capsys), 2, "meta.json", "replace an input")
    one_line(*cli(conflicts(ds, out, "--drop", os.path.join(ds["rec"], "train.idx")), capsys), 2, "train.idx")
    one_line(*cli(conflicts(ds, out, "--drop", str(tmp_path / "c_pairs.csv")), capsys), 2, "--drop", "c_pairs.csv")
    one_line(*cli(conflicts(ds, out, "--drop", str(tmp_path / "d.json")), capsys), 2, "--drop", "name the index .idx")
    one_line(*cli(conflicts(ds, out, "--drop", str(tmp_path / "c.idx")), capsys), 2, "--drop", "c.json",
             "an output of --out")
    one_line(*cli(conflicts(ds, tmp_path / "c.txt"), capsys), 2, "--out", ".json")
    one_line(*cli(conflicts(ds, out, "--method", "exact", "--nprobe", "4"), capsys), 2, "--nprobe", "leave them out")
    one_line(*cli(conflicts(ds, tmp_path / "no" / "c.json"), capsys), 1, "does not exist")
    one_line(*cli(conflicts(ds, out, "--centers", ds["centers"] + ".missing"), capsys), 1, "--centers", "not found")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((41, 64), np.float32))
    one_line(*cli(conflicts(ds, out, "--centers", str(wrong)), capsys), 1, str(wrong), "41, 64", "128")
    few = tmp_path / "few.npy"
    np.save(few, np.ones((5, 128), np.float32))
    one_line(*cli(conflicts(ds, out, "--centers", str(few)), capsys), 1, str(few), "num_classes > 40")
    one_line(*cli(["conflicts", "--features", str(tmp_path / "none"), "--rec", ds["rec"], "--out", str(out)],
                  capsys), 1, "none")
    other = tmp_path / "other"
    images, labels, _ = synthetic_faces(n_ids=5, seed=9)
    write_recordio(str(other), images, labels, "im2rec")
    one_line(*cli(["conflicts", "--features", ds["feats"], "--rec", str(other), "--out", str(out)], capsys), 1,
             "not extracted from")
    one_line(*cli(conflicts(ds, out, "--device", "cuda:99", "--method", "ivf"), capsys), 2, "--method ivf")
    assert not out.exists() and not (tmp_path / "c_pairs.csv").exists()
    assert snapshot(data) == before


def test_a_feature_row_without_direction_is_one_line(ds, capsys, tmp_path):
    import shutil
    bad = tmp_path / "feats"
    shutil.copytree(ds["feats"], bad)
    f = np.load(bad / "features.npy")
    f[5] = 0
    np.save(bad / "features.npy", f)
    out = tmp_path / "c.json"
    status, lines = cli(["conflicts", "--features", str(bad), "--rec", ds["rec"], "--out", str(out)], capsys)
    # found while the file is read: the progress bar's lines come first, then the one error line
    assert status == 1 and "features.npy: row 5 is not finite or all zero" in lines[-1]
    assert "extract the features again" in lines[-1] and lines[-1].startswith("face_nms conflicts: error:")
    assert not out.exists()


# ---- degenerate searches and thresholds say so ----

def test_neighbours_the_ivf_probes_missed_do_not_enter_the_threshold():
    feats, labels, truth = planted(n_ids=300, dup=10, seed=2)
    exact = find_conflicts(feats, labels, faces=False, method="exact")
    # one center per cell, one cell probed: most centers find no other center in their probes
    ivf = find_conflicts(feats, labels, faces=False, method="ivf", nlist=300, nprobe=1)
    assert ivf.threshold == pytest.approx(exact.threshold, abs=1e-3) and ivf.threshold > 0, ivf.rule
    assert set(ivf.label_pairs()[i][:2] for i in range(len(ivf.pairs))) == \
        set(exact.label_pairs()[i][:2] for i in range(len(exact.pairs)))
    assert ivf.search["searched_again_exactly"] > 150 and ivf.warnings == []


def test_without_the_exact_search_again_only_found_neighbours_count(monkeypatch):
    import plugins.face_nms.conflicts as conflicts_module
    monkeypatch.setattr(conflicts_module, "SEARCH_AGAIN_PAIRS", 0)
    feats, labels, _ = planted(n_ids=300, dup=10, seed=2)
    ivf = find_conflicts(feats, labels, faces=False, method="ivf", nlist=300, nprobe=1)
    missed, n = int(np.isnan(ivf.nearest_other).sum()), len(ivf.ids)
    assert missed > 150 and ivf.threshold > 0 and ivf.rule["identities_counted"] == n - missed
    assert len(ivf.warnings) == 1 and ivf.warnings[0].startswith(
        f"{missed} of {n} identity centers found no other center in their IVF probes (nprobe 1 of nlist 300)")
    assert "raise --nprobe or use --method exact" in ivf.warnings[0]


def test_a_default_threshold_at_the_edge_warns():
    # 12 centers on a circle with uneven gaps: the nearest-other cosines spread too widely for the outlier rule
    angles = np.cumsum([0.1, 0.9, 0.2, 0.8, 0.15, 0.7, 0.3, 0.6, 0.25, 0.5, 0.35, 0.45])
    centers = np.stack([np.cos(angles), np.sin(angles), np.zeros(12)], 1).astype(np.float32)
    labels = np.repeat(np.arange(12), 2)
    res = find_conflicts(centers[labels].astype(np.float16), labels, faces=False)
    assert res.rule["median"] + 6 * res.rule["robust_sigma"] > 1 and res.threshold == 1.0
    assert len(res.pairs) == 0 and len(res.warnings) == 1, res.warnings
    assert res.warnings[0].startswith("the default threshold reaches 1.0000"), res.warnings
    assert "give --threshold" in res.warnings[0]


def test_cli_refuses_an_empty_drop_index_and_warns_on_a_full_one(ds, capsys, tmp_path):
    out, drop = tmp_path / "c.json", tmp_path / "clean.idx"
    # every face nearer another identity's center than its own: the centers point away from their faces
    f = np.load(os.path.join(ds["feats"], "features.npy")).astype(np.float32)
    labels = np.load(os.path.join(ds["feats"], "labels.npy"))
    away = tmp_path / "away.npy"
    np.save(away, -np.stack([f[labels == y].mean(0) for y in range(41)]))
    status, lines = cli(conflicts(ds, out, "--centers", str(away), "--k", "40", "--drop", str(drop),
                                  "--drop-mode", "faces"), capsys)
    assert status == 1 and lines[-1].startswith(f"face_nms conflicts: error: --drop {drop}: the faces drop removes "
                                                f"every one of the {len(labels)} faces"), lines
    assert "check --threshold" in lines[-1] and sorted(os.listdir(tmp_path)) == ["away.npy"]
    status, lines = cli(conflicts(ds, out, "--threshold", "1", "--drop", str(drop)), capsys)
    assert status == 0, lines
    warned = [line for line in lines if line.startswith("face_nms conflicts: warning: ")]
    assert len(warned) == 1 and f"--drop {drop} drops nothing" in warned[0], lines
    assert json.load(open(out))["warnings"] == [warned[0][len("face_nms conflicts: warning: "):]]
