"""Benchmark overlap: training identities found in evaluation .bin files, the report and the exclusion index."""
import json
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_cli import cli

from plugins.face_nms import find_overlap
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.eval_bin import decode, read_bin
from plugins.face_nms.extract import extract_features
from plugins.face_nms.features import load_features
from plugins.face_nms.models import OnnxModel
from plugins.face_nms.recordio_index import read_idx, read_index

PLANTED = 8  # training identities 0..7 have other faces in the .bin; identity 8 an identical copy of one face


class PoolNet(torch.nn.Module):
    """A fixed recognition model for the synthetic faces: 8x8 mean colours, each channel's mean removed.
    Unlike the random TinyNet its features separate the synthetic identities (cosine ~0.8 within one,
    ~0.3 to the nearest other), so precision and recall can be measured end to end."""

    def forward(self, x):
        p = torch.nn.functional.avg_pool2d(x, 14)
        return (p - p.mean(dim=(2, 3), keepdim=True)).flatten(1)


def _onnx(net, path):
    torch.onnx.export(net.eval(), torch.zeros(1, 3, 112, 112), path, input_names=["data"], output_names=["fc1"],
                      dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}}, opset_version=13, dynamo=False)
    return path


def _jpeg(img, fmt=".jpg"):
    import cv2
    ok, buf = cv2.imencode(fmt, np.ascontiguousarray(img[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def _mx_encoded(img):
    """Image bytes through mxnet's own pack_img (the path insightface's packing tools take)."""
    from plugins.compat import import_mxnet
    mx = import_mxnet()
    packed = mx.recordio.pack_img(mx.recordio.IRHeader(0, 0.0, 0, 0), np.ascontiguousarray(img[:, :, ::-1]),
                                  quality=95, img_fmt=".jpg")
    return mx.recordio.unpack(packed)[1]


def write_bin(path, images, encode=lambda i, im: _jpeg(im)):
    """An evaluation .bin as insightface writes it: pickle.dump((bins, issame_list))."""
    assert len(images) % 2 == 0
    bins = [encode(i, im) if not isinstance(im, bytes) else im for i, im in enumerate(images)]
    issame = [bool(i % 2) for i in range(len(images) // 2)]
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """train.rec (im2rec, shuffled), features from a real extract run with an ONNX model, two .bin files."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("overlap")
    images, labels, _ = synthetic_faces(n_ids=24, seed=11, burst_every=1000)
    held = np.zeros(len(labels), bool)
    for k in range(PLANTED):
        rows = np.flatnonzero(labels == k)
        held[rows[-2:]] = True  # other photos of a training identity: in the .bin, not in train.rec
    copy_row = np.flatnonzero(labels == PLANTED)[0]  # this training face itself goes into the .bin too
    rec = str(root / "train")
    write_recordio(rec, images[~held], labels[~held], "im2rec", shuffle_seed=5)
    onnx = _onnx(PoolNet(), str(root / "pool.onnx"))
    feats = extract_features(rec, str(root / "features"), OnnxModel(onnx, "cpu"), batch_size=32, workers=0,
                             progress=False)
    strangers, _, _ = synthetic_faces(n_ids=8, seed=99, burst_every=1000)
    # lfw: planted faces of identities 0..3, the identical copy, strangers; agedb: identities 4..7, strangers
    lfw_rows = np.flatnonzero(held & (labels < 4))
    lfw = [images[r] for r in lfw_rows] + [images[copy_row]] + list(strangers[:24])
    lfw_truth = [int(labels[r]) for r in lfw_rows] + [PLANTED] + [-1] * 24
    if len(lfw) % 2:
        lfw, lfw_truth = lfw[:-1], lfw_truth[:-1]
    agedb_rows = np.flatnonzero(held & (labels >= 4))
    agedb = list(strangers[24:]) + [images[r] for r in agedb_rows]
    agedb_truth = [-1] * len(strangers[24:]) + [int(labels[r]) for r in agedb_rows]
    if len(agedb) % 2:
        agedb, agedb_truth = agedb[1:], agedb_truth[1:]
    lfw_bin = write_bin(root / "lfw.bin", lfw, lambda i, im: _jpeg(im, ".png" if i % 3 == 0 else ".jpg"))
    agedb_bin = write_bin(root / "agedb_30.bin", agedb, lambda i, im: _mx_encoded(im))
    return SimpleNamespace(root=root, rec=rec, feats=feats, onnx=onnx, lfw=lfw_bin, agedb=agedb_bin,
                           truth={lfw_bin: lfw_truth, agedb_bin: agedb_truth}, copy_index=len(lfw_rows),
                           planted=set(range(PLANTED + 1)))


def overlap(w, *extra, bins=None):
    argv = ["overlap", "--features", w.feats, "--rec", w.rec, "--onnx", w.onnx, "--device", "cpu"]
    for b in bins or [w.lfw, w.agedb]:
        argv += ["--bin", b]
    return argv + list(extra)


def test_cli_finds_the_planted_identities_at_the_default_threshold(world, tmp_path, capsys):
    out, idx = str(tmp_path / "overlap.json"), str(tmp_path / "train_no_overlap.idx")
    status, err = cli(overlap(world, "--out", out, "--exclude", idx), capsys)
    assert status == 0, err
    report = json.load(open(out))
    found = set(report["totals"]["labels"])
    assert len(found & world.planted) / len(world.planted) >= 0.95
    assert len(found & world.planted) / len(found) >= 0.9
    assert report["threshold_rule"]["rule"].startswith("robust equal-error point")
    assert 0 < report["threshold"] < 1 and report["search"]["method"] == "exact"
    # every match is a face of that identity, and the identical training face is found with cosine ~ its own
    for entry in report["bins"]:
        truth = world.truth[entry["bin"]]
        assert entry["images"] == len(truth) and entry["pairs"] == len(truth) // 2
        for ident in entry["identities"]:
            assert ident["cosine"] >= report["threshold"]
            assert all(truth[i] == ident["label"] for i in ident["image_indices"]), (ident, truth)
    lfw = next(e for e in report["bins"] if e["bin"] == os.path.abspath(world.lfw))
    copy = next(i for i in lfw["identities"] if i["label"] == PLANTED)
    assert world.copy_index in copy["image_indices"]
    # the exclusion index: every training record of the other identities, at its offset
    index = read_index(world.rec)
    keep = ~np.isin(index.labels, sorted(found))
    keys, offsets = read_idx(idx)
    assert np.array_equal(keys, index.keys[keep]) and np.array_equal(offsets, index.offsets[keep])
    ex = report["exclusion"]
    assert ex["kept"] == int(keep.sum()) and ex["removed_identities"] == len(found)
    assert json.load(open(tmp_path / "train_no_overlap.json"))["kept"] == int(keep.sum())
    assert sorted(os.listdir(tmp_path)) == ["overlap.html", "overlap.json", "train_no_overlap.idx",
                                           "train_no_overlap.json"]


def test_exclusion_index_is_accepted_by_the_training_filter(world, tmp_path, capsys):
    from plugins.face_nms.filter import face_nms_filter
    from plugins.registry import apply_dataset_filter  # noqa: F401  (registers the filters as training does)
    idx = str(tmp_path / "clean.idx")
    status, err = cli(overlap(world, "--out", str(tmp_path / "clean.json"), "--exclude", idx), capsys)
    assert status == 0, err
    cfg = SimpleNamespace(rec=world.rec, dataset_filter="face_nms", face_nms=dict(index=idx))
    cfg.get = lambda k, d=None: getattr(cfg, k, d)
    ds = face_nms_filter(cfg, SimpleNamespace(imgidx=np.arange(3)))
    assert np.array_equal(ds.imgidx, read_idx(idx)[0]) and cfg.train_idx == idx
    # here the report is the index's summary too (same stem): the filter reads it
    assert json.load(open(tmp_path / "clean.json"))["dataset"]["label_sample"]["keys"]
    status, err = cli(["stats", "--rec", world.rec, "--index", idx], capsys)
    assert status == 0
    # the same file named two ways (./clean.json): still one summary, holding the label sample
    os.remove(tmp_path / "clean.json")
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        status, err = cli(overlap(world, "--out", "./clean.json", "--exclude", "clean.idx"), capsys)
    finally:
        os.chdir(here)
    assert status == 0, err
    assert json.load(open(tmp_path / "clean.json"))["dataset"]["label_sample"]["keys"]


def test_find_overlap_api_matches_the_cli(world, tmp_path, capsys):
    from plugins.face_nms.overlap import embed
    feats, labels, _, meta = load_features(world.feats, world.rec)
    model = OnnxModel(world.onnx, "cpu")
    evals = np.concatenate([embed(model, read_bin(b), meta["flip"]) for b in (world.lfw, world.agedb)])
    got = find_overlap(feats, labels, evals)
    out = str(tmp_path / "o.json")
    assert cli(overlap(world, "--out", out), capsys)[0] == 0
    assert got.dtype == np.int64 and np.all(np.diff(got) > 0)
    assert got.tolist() == json.load(open(out))["totals"]["labels"]
    # an explicit threshold above every cosine finds nothing; -1 finds every nearest identity
    assert len(find_overlap(feats, labels, evals, 1.0)) == 0
    assert len(find_overlap(feats, labels, evals, -1.0)) >= len(got)


def test_eval_images_take_the_flip_setting_of_the_extraction(world, tmp_path, capsys):
    from plugins.face_nms.centers import identity_centers
    from plugins.face_nms.overlap import embed
    flipped = extract_features(world.rec, str(tmp_path / "flip"), OnnxModel(world.onnx, "cpu"), flip=True,
                               batch_size=32, workers=0, progress=False)
    out = str(tmp_path / "o.json")
    argv = overlap(world, "--out", out, bins=[world.lfw])
    argv[argv.index(world.feats)] = flipped
    assert cli(argv, capsys)[0] == 0
    report = json.load(open(out))
    got = next(i for i in report["bins"][0]["identities"] if i["label"] == PLANTED)["cosine"]
    feats, labels, _, _ = load_features(flipped, world.rec)
    ids, C, _ = identity_centers(feats, labels)
    model, b = OnnxModel(world.onnx, "cpu"), read_bin(world.lfw)
    want = {flip: float(embed(model, b, flip)[world.copy_index] @ C[PLANTED]) for flip in (True, False)}
    assert report["flip"] is True and got == pytest.approx(want[True], abs=1e-5)
    assert abs(want[True] - want[False]) > 1e-3


def _synthetic_features(rng, n_ids, dim=256):
    return rng.standard_normal((n_ids, dim)).astype(np.float32)


def _faces(rng, directions, sizes, noise):
    rows = np.repeat(np.arange(len(directions)), sizes)
    f = directions[rows] + noise * rng.standard_normal((len(rows), directions.shape[1])).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True), rows


def test_find_overlap_precision_and_recall_on_realistic_cosines():
    """Feature level: 1,500 identities (cosine of a face to its center ~0.7, to the nearest other ~0.25),
    1% of them packed twice under two labels; 60 planted identities with 1..4 harder evaluation faces
    each (cosine to their center ~0.6), 300 evaluation identities absent from training."""
    rng = np.random.default_rng(0)
    dirs = _synthetic_features(rng, 1500)
    dirs[1485:] = dirs[:15]  # the same person under a second label
    train, labels = _faces(rng, dirs, rng.integers(2, 30, len(dirs)), 1.0)
    planted = rng.choice(np.arange(15, 1485), 60, replace=False)
    ev_planted, _ = _faces(rng, dirs[planted], rng.integers(1, 5, len(planted)), 1.25)
    ev_strangers, _ = _faces(rng, _synthetic_features(rng, 300), 4, 1.25)
    found = find_overlap(train.astype(np.float16), labels, np.concatenate([ev_planted, ev_strangers]))
    hit = np.isin(planted, found).mean()
    precision = np.isin(found, planted).mean()
    assert hit >= 0.95 and precision >= 0.9, (hit, precision, len(found))


def test_default_threshold_is_the_robust_equal_error_point():
    from plugins.face_nms.overlap import equal_error_threshold
    rng = np.random.default_rng(1)
    genuine, impostor = 0.7 + 0.1 * rng.standard_normal(20000), 0.3 + 0.05 * rng.standard_normal(20000)
    t, rule = equal_error_threshold(genuine, impostor)
    # (t - 0.3) / 0.05 = (0.7 - t) / 0.1: t = 0.4333, 2.67 spreads from each median
    assert t == pytest.approx(0.4333, abs=0.005) and rule["separation"] == pytest.approx(2.67, abs=0.05)
    assert rule["false_match_rate"] == pytest.approx(rule["false_non_match_rate"], abs=0.002)
    # 3% of the impostors are genuine cosines (one person under two labels): t moves by < 0.01
    t2, _ = equal_error_threshold(genuine, np.concatenate([impostor[:19400], genuine[:600]]))
    assert abs(t2 - t) < 0.01
    with pytest.raises(ValueError, match="no impostor cosine"):
        equal_error_threshold(genuine, [])


def test_bin_images_are_decoded_as_the_host_loads_them(tmp_path):
    """mx.image.imdecode, and resize_short(112) when the width is not 112, as the host's load_bin does."""
    import cv2
    from plugins.compat import import_mxnet
    mx = import_mxnet()
    images, _, _ = synthetic_faces(n_ids=1, seed=4, size=150)
    small = cv2.resize(images[1], (112, 112), interpolation=cv2.INTER_AREA)
    path = write_bin(tmp_path / "x.bin", [_jpeg(images[0], ".png"), _jpeg(small)])
    b = read_bin(path)
    for i in range(2):
        host = mx.image.imdecode(b.bins[i])
        if host.shape[1] != 112:
            host = mx.image.resize_short(host, 112)
        diff = np.abs(decode(b, i).astype(int) - host.asnumpy().astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (i, diff.max(), diff.mean())


# ---- bad inputs: one line, the file or value, what to do; nothing written ----

def _bad_bin(tmp_path, kind):
    good = _jpeg(np.full((112, 112, 3), 128, np.uint8))
    path = tmp_path / f"{kind}.bin"
    if kind == "not-a-pickle":
        path.write_bytes(b"\x89PNG not a pickle at all")
        return str(path)
    obj = {"dict": {"bins": [good, good]},
           "undecodable": ([good, good, good, b"\xff\xd8 broken jpeg"], [True, False]),
           "not-square": ([good, _jpeg(np.zeros((100, 112, 3), np.uint8))], [True]),
           "odd": ([good] * 5, [True, False]),
           "count": ([good] * 6, [True, False]),
           "empty": ([], []),
           "issame-text": ([good, good], ["yes"])}[kind]
    path.write_bytes(pickle.dumps(obj))
    return str(path)


@pytest.mark.parametrize("kind,words", [
    ("not-a-pickle", ["not-a-pickle.bin is not an evaluation .bin pickle", "pickle.dump((bins, issame_list))"]),
    ("dict", ["dict.bin holds a dict, not (bins, issame_list)"]),
    ("undecodable", ["undecodable.bin: image 3", "not a decodable image"]),
    ("not-square", ["not-square.bin: image 1 is 112x100, not square"]),
    ("odd", ["odd.bin holds 5 images, an odd number"]),
    ("count", ["count.bin holds 6 images for 2 issame entries"]),
    ("empty", ["empty.bin holds no image pairs"]),
    ("issame-text", ["issame-text.bin: issame_list holds", "not bools"]),
])
def test_bad_bin_is_one_line(world, tmp_path, capsys, kind, words):
    out = str(tmp_path / "o.json")
    status, err = cli(overlap(world, "--out", out, "--exclude", str(tmp_path / "x.idx"),
                              bins=[world.lfw, _bad_bin(tmp_path, kind)]), capsys)
    assert status == 1 and len(err) == 1, err
    assert all(w in err[0] for w in words), err
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "x.idx")


def test_pickle_asking_for_other_classes_is_refused_unrun(world, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.bin"
    bad.write_bytes(pickle.dumps(([Evil(), b""], [True])))
    status, err = cli(overlap(world, "--out", str(tmp_path / "o.json"), bins=[str(bad)]), capsys)
    assert status == 1 and len(err) == 1 and "evil.bin is not an evaluation .bin pickle" in err[0], err
    assert "system, which an evaluation .bin does not hold" in err[0] and not marker.exists()


def test_model_other_than_the_features_is_refused(world, tmp_path, capsys):
    other = _onnx(TinyNet(seed=0), str(tmp_path / "tiny.onnx"))
    argv = overlap(world, "--out", str(tmp_path / "o.json"))
    argv[argv.index(world.onnx)] = other
    status, err = cli(argv, capsys)
    assert status == 1 and len(err) == 1, err
    assert f"model mismatch: the features in {world.feats} were extracted with ONNX model sha256" in err[0]
    assert f"but {other} is ONNX model sha256" in err[0] and "pass the model the features came from" in err[0]
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    argv = overlap(world, "--out", str(tmp_path / "o.json"))
    argv[argv.index("--onnx"):argv.index("--onnx") + 2] = ["--checkpoint", str(ckpt), "--network", "r50"]
    status, err = cli(argv, capsys)
    assert status == 1 and "checkpoint sha256" in err[0] and "(network r50, embedding size 512)" in err[0], err
    assert not os.path.exists(tmp_path / "o.json")


@pytest.mark.parametrize("case,status_want,words", [
    ("out-is-bin", 2, ["--out", "lfw.bin is the evaluation set", "choose another --out"]),
    ("out-is-meta", 2, ["meta.json is the features' meta.json"]),
    ("exclude-is-train-idx", 2, ["--exclude", "the dataset's train.idx"]),
    ("exclude-is-out", 2, ["--exclude", "o.json: name the index .idx (its summary <stem>.json goes beside it)"]),
    ("exclude-is-json", 2, ["--exclude", "x.json: name the index .idx"]),
    ("missing-folder", 1, ["does not exist; create it first"]),
    ("missing-bin", 1, ["--bin", "nope.bin not found: check the path"]),
    ("missing-onnx", 1, ["--onnx", "nope.onnx not found"]),
    ("missing-features", 1, ["holds no finished extraction"]),
    ("threshold-high", 2, ["--threshold", "must be a cosine in [-1, 1], got 1.5"]),
    ("threshold-nan", 2, ["--threshold", "must be a cosine in [-1, 1]"]),
    ("no-model", 2, ["--checkpoint model.pt --network NAME or --onnx model.onnx"]),
    ("no-network", 2, ["--checkpoint needs --network"]),
    ("bin-twice", 2, ["is given twice"]),
    ("bin-is-a-device", 1, ["--bin /dev/zero is not a regular file (a device, pipe or socket)"]),
    ("everything-removed", 1, ["--exclude", "holds every one of the 24 training identities", "check --threshold"]),
])
def test_bad_command_lines_are_one_line(world, tmp_path, capsys, case, status_want, words):
    out, idx = str(tmp_path / "o.json"), str(tmp_path / "x.idx")
    before = {p: open(p, "rb").read() for p in (world.lfw, os.path.join(world.rec, "train.idx"),
                                                 os.path.join(world.feats, "meta.json"))}
    argv = {
        "out-is-bin": overlap(world, "--out", world.lfw),
        "out-is-meta": overlap(world, "--out", os.path.join(world.feats, "meta.json")),
        "exclude-is-train-idx": overlap(world, "--out", out, "--exclude", os.path.join(world.rec, "train.idx")),
        "exclude-is-out": overlap(world, "--out", out, "--exclude", out),
        "exclude-is-json": overlap(world, "--out", out, "--exclude", str(tmp_path / "x.json")),
        "missing-folder": overlap(world, "--out", str(tmp_path / "no" / "o.json")),
        "missing-bin": overlap(world, "--out", out, bins=[str(tmp_path / "nope.bin")]),
        "missing-onnx": [a if a != world.onnx else str(tmp_path / "nope.onnx") for a in overlap(world, "--out", out)],
        "missing-features": [a if a != world.feats else str(tmp_path) for a in overlap(world, "--out", out)],
        "threshold-high": overlap(world, "--out", out, "--threshold", "1.5"),
        "threshold-nan": overlap(world, "--out", out, "--threshold", "nan"),
        "no-model": [a for a in overlap(world, "--out", out) if a not in ("--onnx", world.onnx)],
        "no-network": [a if a != "--onnx" else "--checkpoint" for a in overlap(world, "--out", out)],
        "bin-twice": overlap(world, "--out", out, bins=[world.lfw, world.lfw]),
        "bin-is-a-device": overlap(world, "--out", out, bins=[world.lfw, "/dev/zero"]),
        "everything-removed": overlap(world, "--out", out, "--exclude", idx, "--threshold", "-1"),
    }[case]
    status, err = cli(argv, capsys)
    assert status == status_want and len(err) == 1, err
    assert all(w in err[0] for w in words), err
    assert not os.path.exists(out) and not os.path.exists(idx)
    assert before == {p: open(p, "rb").read() for p in before}


def test_bin_importing_a_numpy_submodule_is_refused_through_the_command(world, tmp_path, capsys):
    # 28 bytes whose import would run f2py on this program's command line (and exit 0 without a report)
    bad = tmp_path / "f2py.bin"
    bad.write_bytes(b"cnumpy.f2py.__main__\ndtype\n.")
    assert len(bad.read_bytes()) == 28
    status, err = cli(overlap(world, "--out", str(tmp_path / "o.json"), bins=[world.lfw, str(bad)]), capsys)
    assert status == 1 and len(err) == 1, err
    assert f"--bin {bad} is not an evaluation .bin pickle: it asks for numpy.f2py.__main__.dtype" in err[0], err
    assert "numpy.f2py.__main__" not in __import__("sys").modules and not os.path.exists(tmp_path / "o.json")


def test_a_default_threshold_at_the_edge_warns():
    from plugins.face_nms.overlap import search_overlap
    rng = np.random.default_rng(0)
    # a collapsed model: every face of every identity points nearly one way
    labels = np.repeat(np.arange(40), 5)
    feats = np.ones((len(labels), 64)) + 1e-4 * rng.standard_normal((40, 64))[labels] \
        + 1e-5 * rng.standard_normal((len(labels), 64))
    res = search_overlap(feats.astype(np.float32), labels, [feats[:4].astype(np.float32)])
    assert res.threshold > 0.999 and len(res.warnings) == 1, (res.threshold, res.warnings)
    assert res.warnings[0].startswith(f"the default threshold is {res.threshold:.4f}, at the end of [-1, 1]")
    assert "give --threshold" in res.warnings[0]
    ok = search_overlap(*_planted_overlap(), threshold=None)
    assert ok.warnings == []


def _planted_overlap():
    rng = np.random.default_rng(1)
    directions = _synthetic_features(rng, 30)
    feats, labels = _faces(rng, directions, np.full(30, 6), 0.6)
    return feats, labels, [feats[:10]]


def test_an_exclusion_index_of_every_face_warns(world, tmp_path, capsys):
    out, idx = str(tmp_path / "o.json"), str(tmp_path / "x.idx")
    status, err = cli(overlap(world, "--out", out, "--exclude", idx, "--threshold", "1"), capsys)
    assert status == 0, err
    warned = [line for line in err if line.startswith("face_nms overlap: warning: ")]
    assert len(warned) == 1 and f"the exclusion index {idx} lists every training face" in warned[0], err
    assert json.load(open(out))["warnings"] == [warned[0][len("face_nms overlap: warning: "):]]
