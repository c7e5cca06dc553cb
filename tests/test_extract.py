import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gloo_group
from plugins.face_nms.__main__ import main as cli
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import RecordImages, TorchModel, extract_features, load_features
from plugins.face_nms.recordio_index import read_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
    images, labels, _ = synthetic_faces(n_ids=10, seed=2)
    d = tmp_path_factory.mktemp("rec")
    write_recordio(str(d), images, labels, "im2rec", shuffle_seed=3)
    return str(d)


def model():
    torch.set_num_threads(1)  # identical float results across processes
    return TorchModel(TinyNet(seed=0), "cpu")


def test_features_match_the_host_preprocessing(rec_dir, tmp_path):
    out = extract_features(rec_dir, str(tmp_path / "f"), model(), batch_size=16, workers=0, chunk_rows=32,
                           progress=False)
    feats, labels, keys, meta = load_features(out, rec_dir)
    index = read_index(rec_dir)
    assert feats.dtype == np.float16 and feats.shape == (len(index), 128)
    assert np.array_equal(keys, index.keys) and np.array_equal(labels, index.labels)
    assert meta["count"] == len(index) and meta["dimension"] == 128 and meta["layout"] == "im2rec"
    assert np.allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1, atol=2e-3)
    # one record by hand: mxnet decode, RGB, (x/255-0.5)/0.5, forward, L2 norm
    from plugins.compat import import_mxnet
    mx = import_mxnet()
    r = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "r")
    _, img = mx.recordio.unpack(r.read_idx(int(keys[5])))
    rgb = mx.image.imdecode(img).asnumpy()
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        f = TinyNet(seed=0)((x - 0.5) / 0.5)
    f = torch.nn.functional.normalize(f, dim=1).numpy()[0]
    assert np.allclose(feats[5].astype(np.float32), f, atol=2e-3)
    assert sorted(os.listdir(out)) == ["features.npy", "keys.npy", "labels.npy", "meta.json"]


def test_flip_adds_the_mirrored_feature(rec_dir, tmp_path):
    a = extract_features(rec_dir, str(tmp_path / "plain"), model(), batch_size=16, workers=0, progress=False)
    b = extract_features(rec_dir, str(tmp_path / "flip"), model(), batch_size=16, workers=0, flip=True,
                         progress=False)
    fa, fb = np.load(os.path.join(a, "features.npy")), np.load(os.path.join(b, "features.npy"))
    assert not np.allclose(fa, fb, atol=1e-2)
    images = RecordImages(os.path.join(rec_dir, "train.rec"), read_index(rec_dir).offsets)
    batch = torch.stack([images[i] for i in range(4)])
    net = TinyNet(seed=0)
    x = (batch.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        f = net(x) + net(torch.flip(x, dims=[3]))
    f = torch.nn.functional.normalize(f, dim=1).numpy()
    assert np.allclose(fb[:4].astype(np.float32), f, atol=2e-3)
    assert json.load(open(os.path.join(b, "meta.json")))["flip"] is True


def test_resume_after_stop_equals_uninterrupted(rec_dir, tmp_path):
    full = extract_features(rec_dir, str(tmp_path / "full"), model(), batch_size=8, workers=2, chunk_rows=16,
                            progress=False)
    out = str(tmp_path / "part")
    assert extract_features(rec_dir, out, model(), batch_size=8, workers=0, chunk_rows=16, max_chunks=2,
                            progress=False) is None
    assert not os.path.exists(os.path.join(out, "features.npy"))
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_features(out)
    with pytest.raises(ValueError, match="other settings"):
        extract_features(rec_dir, out, model(), batch_size=4, workers=0, chunk_rows=16, progress=False)
    assert extract_features(rec_dir, out, model(), batch_size=8, workers=0, chunk_rows=16, progress=False) == out
    assert np.array_equal(np.load(os.path.join(full, "features.npy")), np.load(os.path.join(out, "features.npy")))


def test_killed_process_resumes(rec_dir, tmp_path):
    out = str(tmp_path / "killed")
    script = (f"import sys, time, torch; sys.path.insert(0, {ROOT!r});"
              "from plugins.face_nms.demo import TinyNet; from plugins.face_nms.extract import *;"
              "torch.set_num_threads(1)\n"
              "class Slow(TorchModel):\n"
              "    def __call__(self, images, flip):\n"
              "        time.sleep(0.05); return super().__call__(images, flip)\n"
              f"extract_features({rec_dir!r}, {out!r}, Slow(TinyNet(seed=0), 'cpu'), batch_size=8, workers=0,"
              " chunk_rows=16, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    progress = os.path.join(out, "progress")
    deadline = time.time() + 60
    while time.time() < deadline:
        done = sum(len(open(os.path.join(progress, f)).read().split()) for f in os.listdir(progress)) \
            if os.path.isdir(progress) else 0
        if done >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "features.npy")), "killed before the end"
    assert extract_features(rec_dir, out, model(), batch_size=8, workers=0, chunk_rows=16, progress=False) == out
    ref = extract_features(rec_dir, str(tmp_path / "ref"), model(), batch_size=8, workers=0, chunk_rows=16,
                           progress=False)
    assert np.array_equal(np.load(os.path.join(ref, "features.npy")), np.load(os.path.join(out, "features.npy")))


def _shard_worker(rank, world, port, rec, out):
    gloo_group.join(rank, world, port)
    extract_features(rec, out, model(), batch_size=8, workers=0, chunk_rows=16, progress=False)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_write_the_single_process_file(rec_dir, tmp_path):
    single = extract_features(rec_dir, str(tmp_path / "single"), model(), batch_size=8, workers=0, chunk_rows=16,
                              progress=False)
    out = str(tmp_path / "sharded")
    mp.spawn(_shard_worker, args=(2, gloo_group.free_port(), rec_dir, out), nprocs=2, join=True)
    assert np.array_equal(np.load(os.path.join(single, "features.npy")), np.load(os.path.join(out, "features.npy")))
    assert np.array_equal(np.load(os.path.join(single, "labels.npy")), np.load(os.path.join(out, "labels.npy")))


def test_select_cli_end_to_end_and_bad_inputs(rec_dir, tmp_path, capsys):
    feat_dir = extract_features(rec_dir, str(tmp_path / "f"), model(), batch_size=16, workers=0, progress=False)
    out = str(tmp_path / "train_facenms60.idx")
    cli(["select", "--features", feat_dir, "--rec", rec_dir, "--ratio", "0.6", "--out", out])
    summary = json.load(open(str(tmp_path / "train_facenms60.json")))
    assert abs(summary["kept_fraction"] - 0.6) <= 0.005
    assert sum(summary["kept_per_identity_histogram"].values()) == summary["identities"] == 10
    for png in ("train_facenms60_retention.png", "train_facenms60_nn_cosine.png"):
        assert open(tmp_path / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "kept" in capsys.readouterr().out
    for method in ("random", "global", "local"):
        cli(["select", "--features", feat_dir, "--rec", rec_dir, "--ratio", "0.6", "--method", method,
             "--out", str(tmp_path / f"{method}.idx")])
        assert abs(json.load(open(tmp_path / f"{method}.json"))["kept_fraction"] - 0.6) <= 0.005

    # features of another dataset
    other = tmp_path / "other"
    images, labels, _ = synthetic_faces(n_ids=3, seed=9)
    write_recordio(str(other), images, labels, "im2rec")
    with pytest.raises(SystemExit, match="do not match"):
        cli(["select", "--features", feat_dir, "--rec", str(other), "--ratio", "0.6", "--out", out])
    # non-finite features
    bad = tmp_path / "nan"
    bad.mkdir()
    for name in ("keys.npy", "labels.npy", "meta.json"):
        (bad / name).write_bytes(open(os.path.join(feat_dir, name), "rb").read())
    f = np.load(os.path.join(feat_dir, "features.npy")).copy()
    f[3, 7] = np.nan
    np.save(bad / "features.npy", f)
    with pytest.raises(SystemExit, match="non-finite"):
        cli(["select", "--features", str(bad), "--rec", rec_dir, "--ratio", "0.6", "--out", out])
    with pytest.raises(SystemExit, match="no finished extraction"):
        cli(["select", "--features", str(tmp_path / "nothing"), "--rec", rec_dir, "--ratio", "0.6", "--out", out])
    with pytest.raises(SystemExit):
        cli(["select", "--features", feat_dir, "--rec", rec_dir, "--ratio", "0", "--out", out])
    # the failed runs left the earlier output as it was
    assert json.load(open(str(tmp_path / "train_facenms60.json")))["kept"] == summary["kept"]


def test_demo_runs_and_removes_bursts(tmp_path):
    lines = []
    from plugins.face_nms.demo import run_demo
    sel, idx = run_demo(str(tmp_path), ratio=0.6, out=lines.append)
    assert abs(sel.fraction - 0.6) <= 0.005
    kept_line = next(line for line in lines if line.startswith("burst frames kept"))
    burst_kept, burst_total = [int(v) for v in kept_line.split(":")[1].split(";")[0].split(" of ")]
    other_kept, other_total = [int(v) for v in kept_line.split(":")[2].split(" of ")]
    # near-duplicate frames are removed far more than other faces
    assert burst_kept / burst_total < 0.5 * other_kept / other_total


def test_onnx_model_through_insightface_model_zoo(rec_dir, tmp_path):
    from plugins.face_nms.extract import OnnxModel
    net = TinyNet(seed=0).eval()
    path = str(tmp_path / "tiny.onnx")
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), path, input_names=["data"], output_names=["fc1"],
                      dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}}, opset_version=13, dynamo=False)
    onnx_out = extract_features(rec_dir, str(tmp_path / "onnx"), OnnxModel(path, "cpu"), batch_size=16, workers=0,
                                progress=False)
    torch_out = extract_features(rec_dir, str(tmp_path / "torch"), model(), batch_size=16, workers=0, progress=False)
    a = np.load(os.path.join(onnx_out, "features.npy")).astype(np.float32)
    b = np.load(os.path.join(torch_out, "features.npy")).astype(np.float32)
    assert np.allclose(a, b, atol=2e-3)
    assert json.load(open(os.path.join(onnx_out, "meta.json")))["model"] == "tiny.onnx"
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxModel(str(tmp_path / "missing.onnx"), "cpu")
