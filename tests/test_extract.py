import json
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gloo_group
import stalled_extract
from plugins.face_nms.__main__ import main as cli
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.decode import RecordImages
from plugins.face_nms.extract import extract_features
from plugins.face_nms.features import load_features
from plugins.face_nms.models import TorchModel
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
    with pytest.raises(ValueError, match=r"unfinished extraction of other inputs or settings: "
                                         r"batch_size \(8 then, 4 now\)"):
        extract_features(rec_dir, out, model(), batch_size=4, workers=0, chunk_rows=16, progress=False)
    assert extract_features(rec_dir, out, model(), batch_size=8, workers=0, chunk_rows=16, progress=False) == out
    assert np.array_equal(np.load(os.path.join(full, "features.npy")), np.load(os.path.join(out, "features.npy")))


def test_killed_process_resumes(rec_dir, tmp_path):
    out = str(tmp_path / "killed")
    proc = stalled_extract.start(rec_dir, out, chunks=2)
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
    assert done == 2 and not os.path.exists(os.path.join(out, "features.npy"))
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
    with pytest.raises(SystemExit, match=r"not extracted from .*other: train_idx_sha256 \(\w{12}\.\.\. then"):
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
    with pytest.raises(SystemExit, match="no finished extraction .*; give the --out folder of a finished extract run"):
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
    from plugins.face_nms.models import OnnxModel
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


def _cli_error(argv, capsys):
    """(exit status, message) of a CLI run that must fail with one line and no traceback."""
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    code = exc.value.code
    err = capsys.readouterr().err.strip()
    msg = code if isinstance(code, str) else err.splitlines()[-1] if err else ""
    assert "Traceback" not in err and "\n" not in msg.strip(), err
    return (1 if isinstance(code, str) else code), msg


def _bad_record_dataset(path, payload):
    import mxnet as mx
    images, labels, _ = synthetic_faces(n_ids=2, seed=1)
    keys = write_recordio(str(path), images, labels, "im2rec")
    w = mx.recordio.MXIndexedRecordIO(str(path / "train2.idx"), str(path / "train2.rec"), "w")
    r = mx.recordio.MXIndexedRecordIO(str(path / "train.idx"), str(path / "train.rec"), "r")
    for k in sorted(int(k) for k in keys):
        w.write_idx(k, r.read_idx(k) if k != 3 else mx.recordio.pack(mx.recordio.IRHeader(0, 0.0, 3, 0), payload))
    w.close()
    r.close()
    os.replace(path / "train2.rec", path / "train.rec")
    os.replace(path / "train2.idx", path / "train.idx")
    return str(path)


@pytest.mark.parametrize("payload,match", [(b"", "record (key )?3 .*holds no image bytes"),
                                           (b"not an image", "record 3 .*not hold a decodable image")])
@pytest.mark.parametrize("workers", [0, 1])
def test_bad_record_is_one_line(tmp_path, capsys, payload, match, workers):
    import re
    rec = _bad_record_dataset(tmp_path / "rec", payload)
    onnx = _tiny_onnx(tmp_path)
    code, msg = _cli_error(["extract", "--rec", rec, "--out", str(tmp_path / "f"), "--onnx", onnx, "--device", "cpu",
                            "--workers", str(workers), "--batch-size", "4", "--chunk-rows", "8"], capsys)
    assert code == 1 and re.search(match, msg) and "train.rec" in msg and "repack" in msg, msg


def _tiny_onnx(tmp_path):
    path = str(tmp_path / "tiny.onnx")
    if not os.path.exists(path):
        torch.onnx.export(TinyNet(seed=0).eval(), torch.zeros(1, 3, 112, 112), path, input_names=["data"],
                          output_names=["fc1"], dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}},
                          opset_version=13, dynamo=False)
    return path


@pytest.mark.parametrize("content", [b"", b"garbage, not a protobuf \x00\xff" * 10])
def test_bad_onnx_file_is_one_line(rec_dir, tmp_path, capsys, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    code, msg = _cli_error(["extract", "--rec", rec_dir, "--out", str(tmp_path / "f"), "--onnx", str(bad),
                            "--device", "cpu"], capsys)
    assert code == 1 and "bad.onnx is not an ONNX model" in msg or "bad.onnx is not a recognition model" in msg, msg
    assert not (tmp_path / "f").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_onnx_file_is_one_line(rec_dir, tmp_path, capsys):
    path = _tiny_onnx(tmp_path)
    os.chmod(path, 0)
    code, msg = _cli_error(["extract", "--rec", rec_dir, "--out", str(tmp_path / "f"), "--onnx", path,
                            "--device", "cpu"], capsys)
    assert code == 1 and "cannot be read" in msg and "tiny.onnx" in msg


@pytest.mark.parametrize("argv,match", [(["--embedding-size", "-5"], "--embedding-size: must be a positive integer"),
                                        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
                                        (["--workers", "-1"], "--workers: must be an integer >= 0")])
def test_bad_extract_numbers_are_usage_errors(rec_dir, tmp_path, capsys, argv, match):
    code, msg = _cli_error(["extract", "--rec", rec_dir, "--out", str(tmp_path / "f"), "--onnx", "x.onnx"] + argv,
                           capsys)
    assert code == 2 and match in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_gpu_is_one_line(rec_dir, tmp_path, capsys):
    code, msg = _cli_error(["extract", "--rec", rec_dir, "--out", str(tmp_path / "f"), "--onnx", _tiny_onnx(tmp_path),
                            "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: this machine has no usable CUDA GPU; use --device cpu" in msg, msg
    code, msg = _cli_error(["extract", "--rec", rec_dir, "--out", str(tmp_path / "f"), "--onnx", _tiny_onnx(tmp_path),
                            "--device", "gpu0"], capsys)
    assert code == 2 and "--device 'gpu0' is not a device: use cpu, cuda or cuda:N" in msg, msg


def test_extract_help_shows_defaults_and_workers_follow_the_machine(capsys):
    with pytest.raises(SystemExit):
        cli(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    cpus = min(len(os.sched_getaffinity(0)), 16)
    assert f"at most 16: {cpus})" in text and "(default: 256)" in text and "(default: 512)" in text
    assert "(default: 32768)" in text and "--overwrite" in text


def test_extract_cli_reports_done_and_already_done(rec_dir, tmp_path, capsys):
    out = str(tmp_path / "f")
    argv = ["extract", "--rec", rec_dir, "--out", out, "--onnx", _tiny_onnx(tmp_path), "--device", "cpu",
            "--workers", "0", "--batch-size", "16"]
    cli(argv)
    assert capsys.readouterr().out.strip().endswith(f"features written to {out}")
    cli(argv)
    assert "already holds these features (same dataset, model and flip); nothing to do" in capsys.readouterr().out
    code, msg = _cli_error(argv + ["--flip"], capsys)
    assert code == 1 and "flip (false then, true now)" in msg and "--overwrite" in msg, msg
    cli(argv + ["--flip", "--overwrite"])
    assert json.load(open(os.path.join(out, "meta.json")))["flip"] is True
    assert json.load(open(os.path.join(out, "meta.json")))["provenance"]["model"]["onnx_sha256"]


@pytest.fixture
def host_backbones(tmp_path, monkeypatch):
    """A copy of the host's backbones package (the checkout itself is never written to)."""
    import shutil
    host = os.environ.get("INSIGHTFACE_DIR")
    if not host:
        pytest.skip("INSIGHTFACE_DIR is not set: checkpoint extraction needs the host's backbones package")
    at = tmp_path / "host" / "recognition" / "arcface_torch"
    shutil.copytree(os.path.join(host, "recognition", "arcface_torch", "backbones"), at / "backbones",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("INSIGHTFACE_DIR", str(tmp_path / "host"))
    monkeypatch.syspath_prepend(str(at))
    return at


def test_checkpoint_errors_are_one_line(rec_dir, tmp_path, capsys, host_backbones):
    from backbones import get_model
    ckpt = tmp_path / "model.pt"
    torch.save(get_model("r18", fp16=False, num_features=64).state_dict(), ckpt)
    base = ["extract", "--rec", rec_dir, "--device", "cpu", "--workers", "0", "--checkpoint"]
    garbage, empty = tmp_path / "garbage.pt", tmp_path / "empty.pt"
    garbage.write_bytes(b"not a checkpoint" * 100)
    empty.write_bytes(b"")
    for path in (garbage, empty):
        code, msg = _cli_error(base + [str(path), "--network", "r18", "--out", str(tmp_path / "f")], capsys)
        assert code == 1 and f"{path} is not a PyTorch checkpoint torch.load can read" in msg, msg
    code, msg = _cli_error(base + [str(ckpt), "--network", "nosuchnet", "--out", str(tmp_path / "f")], capsys)
    assert code == 1 and "--network 'nosuchnet' is not a network of the host's backbones.get_model" in msg, msg
    code, msg = _cli_error(base + [str(ckpt), "--network", "r50", "--embedding-size", "64",
                                   "--out", str(tmp_path / "f")], capsys)
    assert code == 1 and "does not hold weights of network 'r50'" in msg and "missing (" in msg and len(msg) < 600, msg
    code, msg = _cli_error(base + [str(ckpt), "--network", "r18", "--out", str(tmp_path / "f")], capsys)
    assert code == 1 and "6 of another shape (fc.bias (64,) vs (512,), fc.weight (64, 25088) vs (512, 25088), ...)" in msg and len(msg) < 600, msg
    assert not (tmp_path / "f").exists()
    cli(base + [str(ckpt), "--network", "r18", "--embedding-size", "64", "--out", str(tmp_path / "f"),
                "--batch-size", "16"])
    prov = json.load(open(tmp_path / "f" / "meta.json"))["provenance"]["model"]
    import hashlib
    assert prov == {"checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(), "network": "r18",
                    "embedding_size": 64}
    # the checkpoint changed under a resumable extraction
    torch.save(get_model("r18", fp16=False, num_features=64).state_dict(), ckpt)
    code, msg = _cli_error(base + [str(ckpt), "--network", "r18", "--embedding-size", "64",
                                   "--out", str(tmp_path / "f")], capsys)
    assert code == 1 and "model.checkpoint_sha256" in msg and "--overwrite" in msg, msg


# ---- a model whose features carry nothing stops on its first batch ----

class Degenerate(torch.nn.Module):
    """A real network whose features carry nothing: zero-initialised weights (all-zero features), dead ReLUs
    in front of the last layer (its bias for every image), BatchNorm statistics that were never valid (NaN)."""

    def __init__(self, kind):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 14 * 14, 64)
        with torch.no_grad():
            if kind == "zeros":
                for p in self.parameters():
                    p.zero_()
            elif kind == "constant":
                self.conv.bias.fill_(-1e4)
            elif kind == "nan":
                self.bn.running_var.fill_(-1.0)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _onnx_of(net, path):
    torch.onnx.export(net.eval(), torch.zeros(1, 3, 112, 112), str(path), input_names=["data"], output_names=["fc1"],
                      dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}}, opset_version=13, dynamo=False)
    return str(path)


DEGENERATE_SAYS = {"zeros": "gives all-zero features", "constant": "gives identical features to different faces",
                   "nan": "gives non-finite features"}


@pytest.mark.parametrize("kind", ["zeros", "constant", "nan"])
def test_degenerate_model_stops_on_the_first_batch_through_the_command(rec_dir, tmp_path, capsys, kind):
    from plugins.face_nms.extract import PROGRESS, _done_chunks
    onnx = _onnx_of(Degenerate(kind), tmp_path / f"{kind}.onnx")
    out = tmp_path / "f"
    code, msg = _cli_error(["extract", "--rec", rec_dir, "--out", str(out), "--onnx", onnx, "--device", "cpu",
                            "--workers", "0", "--batch-size", "16", "--chunk-rows", "32"], capsys)
    assert code == 1, msg
    assert msg.startswith(f"face_nms extract: error: the model {kind}.onnx {DEGENERATE_SAYS[kind]}"), msg
    assert f"on the first 16 images of {rec_dir} " in msg, msg
    assert "BatchNorm statistics" in msg and "--network" in msg and "another task" in msg, msg
    assert not (out / "features.npy").exists() and _done_chunks(str(out / PROGRESS)) == set()


@pytest.mark.parametrize("kind", ["zeros", "constant", "nan"])
def test_degenerate_torch_module_stops_on_the_first_batch(rec_dir, tmp_path, kind):
    from plugins.face_nms.extract import PROGRESS, _done_chunks
    out = tmp_path / "f"
    with pytest.raises((ValueError, FloatingPointError)) as err:
        extract_features(rec_dir, str(out), TorchModel(Degenerate(kind), "cpu"), batch_size=16, workers=0,
                         chunk_rows=32, progress=False)
    assert str(err.value).startswith(f"the model Degenerate {DEGENERATE_SAYS[kind]}"), err.value
    assert _done_chunks(str(out / PROGRESS)) == set()


def test_identical_images_are_not_taken_for_a_constant_model(tmp_path):
    images, labels, _ = synthetic_faces(n_ids=2, seed=5)
    images[:] = images[0]  # one photo packed again and again: the features are alike because the images are
    rec = str(tmp_path / "rec")
    write_recordio(rec, images, labels, "insightface")
    out = extract_features(rec, str(tmp_path / "f"), model(), batch_size=8, workers=0, progress=False)
    feats, _, _, _ = load_features(out)
    assert np.ptp(np.asarray(feats, np.float32), axis=0).max() == 0


def test_zero_initialised_host_backbone_stops_on_the_first_batch(rec_dir, tmp_path, capsys, host_backbones):
    from backbones import get_model
    net = get_model("r18", fp16=False, num_features=64)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    code, msg = _cli_error(["extract", "--rec", rec_dir, "--device", "cpu", "--workers", "0", "--checkpoint",
                            str(ckpt), "--network", "r18", "--embedding-size", "64", "--batch-size", "16",
                            "--out", str(tmp_path / "f")], capsys)
    assert code == 1 and msg.startswith(f"face_nms extract: error: the model r18:{ckpt} gives all-zero features"), msg
    assert not (tmp_path / "f" / "features.npy").exists()
