"""An extraction folder records what it was made from; nothing of another dataset, model or run is mixed in."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import stalled_extract
from plugins.face_nms.__main__ import main as cli
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import extract_features
from plugins.face_nms.features import load_features
from plugins.face_nms.models import TorchModel
from plugins.face_nms.recordio_index import read_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = ["features.npy", "keys.npy", "labels.npy", "meta.json"]


@pytest.fixture(scope="module")
def faces():
    return synthetic_faces(n_ids=6, seed=4)


@pytest.fixture(scope="module")
def rec_dir(faces, tmp_path_factory):
    images, labels, _ = faces
    d = str(tmp_path_factory.mktemp("rec"))
    write_recordio(d, images, labels, "im2rec", shuffle_seed=1)
    return d


@pytest.fixture(scope="module")
def relabelled(faces, tmp_path_factory):
    """The same images at the same keys and byte offsets, with the labels shuffled: only the labels differ."""
    images, labels, _ = faces
    d = str(tmp_path_factory.mktemp("relabelled"))
    write_recordio(d, images, np.random.default_rng(0).permutation(labels), "im2rec", shuffle_seed=1)
    return d


@pytest.fixture(scope="module")
def other_rec(faces, tmp_path_factory):
    """Another dataset with the same number of records, hence the same keys."""
    images, labels, _ = faces
    d = str(tmp_path_factory.mktemp("other"))
    write_recordio(d, images[:, ::-1].copy(), labels, "im2rec", shuffle_seed=2)
    return d


def model(seed=0):
    torch.set_num_threads(1)
    return TorchModel(TinyNet(seed=seed), "cpu")


def extract(rec, out, m=None, **kw):
    kw = dict(dict(batch_size=8, workers=0, chunk_rows=16, progress=False), **kw)
    return extract_features(rec, str(out), m or model(), **kw)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    err = capsys.readouterr().err
    return exc.value.code, str(exc.value.code) + err


def test_meta_records_dataset_and_model(rec_dir, tmp_path):
    out = extract(rec_dir, tmp_path / "f", flip=True)
    prov = json.load(open(os.path.join(out, "meta.json")))["provenance"]
    import hashlib
    idx_digest = hashlib.sha256(open(os.path.join(rec_dir, "train.idx"), "rb").read()).hexdigest()
    st = os.stat(os.path.join(rec_dir, "train.rec"))
    sample = prov["dataset"].pop("train_rec_sample_sha256")
    assert prov["dataset"] == {"train_idx_sha256": idx_digest, "train_rec_bytes": st.st_size,
                               "train_rec_mtime_ns": st.st_mtime_ns}
    assert len(sample) == 64 and int(sample, 16) >= 0
    assert prov["flip"] is True and prov["model"]["module"] == "TinyNet"
    assert prov["model"]["weights_sha256"] != model(seed=1).provenance()["weights_sha256"]
    assert sorted(os.listdir(out)) == OWN


def test_finished_extraction_of_other_provenance_is_refused(rec_dir, other_rec, tmp_path):
    out = extract(rec_dir, tmp_path / "f")
    before = np.load(os.path.join(out, "features.npy"))
    stamp = os.path.getmtime(os.path.join(out, "features.npy"))
    with pytest.raises(ValueError, match=r"flip \(false then, true now\).*--overwrite"):
        extract(rec_dir, out, flip=True)
    with pytest.raises(ValueError, match=r"model.weights_sha256 .*--overwrite"):
        extract(rec_dir, out, model(seed=1))
    with pytest.raises(ValueError, match=r"dataset.train_idx_sha256 .*--overwrite"):
        extract(other_rec, out)
    # the same run again: nothing computed, nothing changed
    assert extract(rec_dir, out) == out
    assert os.path.getmtime(os.path.join(out, "features.npy")) == stamp
    assert np.array_equal(np.load(os.path.join(out, "features.npy")), before)
    # --overwrite starts again
    assert extract(rec_dir, out, flip=True, overwrite=True) == out
    assert json.load(open(os.path.join(out, "meta.json")))["flip"] is True
    assert not np.array_equal(np.load(os.path.join(out, "features.npy")), before)
    assert sorted(os.listdir(out)) == OWN


def test_resume_with_another_model_is_refused(rec_dir, tmp_path):
    out = tmp_path / "part"
    assert extract(rec_dir, out, max_chunks=1) is None
    with pytest.raises(ValueError, match=r"unfinished extraction .*model.weights_sha256 .*--overwrite"):
        extract(rec_dir, out, model(seed=1))
    with pytest.raises(ValueError, match=r"unfinished extraction .*batch_size \(8 then, 4 now\)"):
        extract(rec_dir, out, batch_size=4)
    assert extract(rec_dir, out, model(seed=1), overwrite=True) == str(out)
    ref = extract(rec_dir, tmp_path / "ref", model(seed=1))
    assert np.array_equal(np.load(os.path.join(ref, "features.npy")), np.load(out / "features.npy"))


def test_folder_with_files_that_are_not_ours_is_refused(rec_dir, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "meta.json").write_text('{"experiment": "mine"}')
    with pytest.raises(ValueError, match=r"user holds files that extract did not write \(meta.json"):
        extract(rec_dir, user)
    with pytest.raises(ValueError, match="did not write"):
        extract(rec_dir, user, overwrite=True)
    assert (user / "meta.json").read_text() == '{"experiment": "mine"}'
    assert sorted(os.listdir(user)) == ["meta.json"]

    prog = tmp_path / "prog"
    (prog / "progress").mkdir(parents=True)
    (prog / "progress" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"progress/notes.txt"):
        extract(rec_dir, prog)
    assert (prog / "progress" / "notes.txt").read_text() == "mine"
    assert os.listdir(prog) == ["progress"]

    # our names without a record of ours are not taken for an extraction either
    lone = tmp_path / "lone"
    lone.mkdir()
    np.save(lone / "labels.npy", np.arange(3))
    with pytest.raises(ValueError, match=r"labels.npy"):
        extract(rec_dir, lone)
    assert os.listdir(lone) == ["labels.npy"]

    # a file where the folder should be
    with pytest.raises(ValueError, match="not a folder"):
        extract(rec_dir, user / "meta.json")
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert extract(rec_dir, tmp_path / "empty") == str(tmp_path / "empty")


def test_second_concurrent_extract_is_refused_and_a_killed_lock_is_not_stale(rec_dir, tmp_path):
    out = tmp_path / "busy"
    proc = stalled_extract.start(rec_dir, out, chunks=0)
    try:
        deadline = time.time() + 60
        while not (out / "run.json").exists() and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(ValueError, match=r"another extract is writing to .*busy"):
            extract(rec_dir, out, flip=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert extract(rec_dir, out) == str(out)
    assert json.load(open(out / "meta.json"))["flip"] is False
    ref = extract(rec_dir, tmp_path / "ref")
    assert np.array_equal(np.load(os.path.join(ref, "features.npy")), np.load(out / "features.npy"))
    assert sorted(os.listdir(out)) == OWN


def test_lock_held_by_another_process(rec_dir, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out / ".extract.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another extract"):
            extract(rec_dir, out)
    finally:
        holder.kill()
        holder.wait()
    assert extract(rec_dir, out) == str(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_leaves_only_resumable_state(rec_dir, tmp_path, sig):
    out = tmp_path / "stop"
    proc = stalled_extract.start(rec_dir, out, chunks=0, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "progress").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait()
    # what a kill at any point of the set-up would leave
    (out / "keys.npy.tmp-999999.npy").write_bytes(b"partial")
    (out / "run.json.tmp-999999").write_text("{")
    left = set(os.listdir(out))
    assert left <= {"run.json", "keys.npy", "labels.npy", "features.npy.partial", "progress", ".extract.lock",
                    "keys.npy.tmp-999999.npy", "run.json.tmp-999999"}
    assert extract(rec_dir, out) == str(out)
    assert sorted(os.listdir(out)) == OWN


def test_load_features_refuses_another_dataset(rec_dir, other_rec, relabelled, tmp_path):
    out = extract(rec_dir, tmp_path / "f")
    feats, labels, keys, meta = load_features(out, rec_dir)
    assert np.array_equal(labels, read_index(rec_dir).labels)
    assert np.array_equal(read_index(other_rec).keys, keys)  # the keys alone would match
    with pytest.raises(ValueError, match=r"not extracted from .*other.*train.idx"):
        load_features(out, other_rec)
    # same train.idx, same size, other labels: the sampled records differ
    assert open(os.path.join(relabelled, "train.idx")).read() == open(os.path.join(rec_dir, "train.idx")).read()
    with pytest.raises(ValueError, match=r"relabelled.*: train_rec_sample_sha256 \("):
        load_features(out, relabelled)
    # an extraction recorded before the sampled digest: the recorded fields and a label sample compared
    meta_path = os.path.join(out, "meta.json")
    meta = json.load(open(meta_path))
    for k in ("train_rec_sample_sha256", "train_rec_mtime_ns"):
        del meta["provenance"]["dataset"][k]
    json.dump(meta, open(meta_path, "w"))
    load_features(out, rec_dir)
    with pytest.raises(ValueError, match=r"labels differ for \d+ of \d+ rows compared \(record \d+: \d+ in labels.npy, "
                                         r"\d+ in the dataset\)"):
        load_features(out, relabelled)
    # an extraction that recorded no provenance: keys and every label compared
    del meta["provenance"]
    json.dump(meta, open(meta_path, "w"))
    load_features(out, rec_dir)
    with pytest.raises(ValueError, match=r"labels differ"):
        load_features(out, relabelled)


def test_select_refuses_features_of_a_relabelled_dataset(rec_dir, relabelled, tmp_path, capsys):
    out = extract(rec_dir, tmp_path / "f")
    code, msg = run_cli(["select", "--features", out, "--rec", relabelled, "--ratio", "0.6",
                         "--out", str(tmp_path / "sel.idx")], capsys)
    assert code != 0 and "train_rec_sample_sha256" in msg and "Traceback" not in msg
    assert not (tmp_path / "sel.idx").exists()


@pytest.mark.parametrize("content,match", [("{not json", "not JSON"), ('{"count": 3}', "misses"),
                                           ("[1, 2]", "misses")])
def test_broken_meta_json_is_one_line(rec_dir, tmp_path, content, match):
    out = extract(rec_dir, tmp_path / "f")
    with open(os.path.join(out, "meta.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=match) as exc:
        load_features(out, rec_dir)
    assert "meta.json" in str(exc.value) and "\n" not in str(exc.value)


def test_face_nms_filter_refuses_an_index_of_another_dataset(rec_dir, relabelled, tmp_path, capsys):
    from types import SimpleNamespace

    from plugins.face_nms.filter import face_nms_filter
    out = extract(rec_dir, tmp_path / "f")
    idx = str(tmp_path / "sel.idx")
    cli(["select", "--features", out, "--rec", rec_dir, "--ratio", "0.6", "--out", idx])

    class Cfg(dict):
        __getattr__ = dict.get

        def __setattr__(self, k, v):
            self[k] = v

    def run(rec):
        ds = SimpleNamespace(imgidx=np.arange(3))
        return face_nms_filter(Cfg(rec=rec, dataset_filter="face_nms", face_nms=dict(index=idx)), ds)

    assert len(run(rec_dir).imgidx) == json.load(open(tmp_path / "sel.json"))["kept"]
    with pytest.raises(ValueError, match=r"sel.idx .*train_rec_sample_sha256"):
        run(relabelled)
    # a summary recorded before the sampled digest: the label sample catches the relabelling
    info = json.load(open(tmp_path / "sel.json"))
    del info["dataset"]["train_rec_sample_sha256"]
    (tmp_path / "sel.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"sel.idx .*labels differ \(\d+ of \d+ sampled records; key \d+: \d+ in "):
        run(relabelled)


def test_face_nms_filter_compares_the_recorded_dataset(rec_dir, tmp_path):
    from types import SimpleNamespace

    from plugins.face_nms.provenance import dataset_provenance
    from plugins.face_nms.filter import face_nms_filter
    from plugins.face_nms.recordio_index import write_idx
    index = read_index(rec_dir)
    idx = str(tmp_path / "sel.idx")
    write_idx(idx, index.keys[::2], index.offsets[::2])
    recorded = dict(dataset_provenance(rec_dir), train_rec_bytes=1)
    (tmp_path / "sel.json").write_text(json.dumps({"kept": 3, "dataset": recorded}))
    cfg = SimpleNamespace(rec=rec_dir, dataset_filter="face_nms", face_nms=dict(index=idx))
    cfg.get = lambda k, d=None: getattr(cfg, k, d)
    with pytest.raises(ValueError, match=r"sel.idx was not selected from .*train_rec_bytes \(1 then"):
        face_nms_filter(cfg, SimpleNamespace(imgidx=None))
    (tmp_path / "sel.json").write_text(json.dumps({"dataset": dataset_provenance(rec_dir)}))
    assert len(face_nms_filter(cfg, SimpleNamespace(imgidx=None)).imgidx) == len(index.keys[::2])
    (tmp_path / "sel.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"sel.json \(the summary of .*sel.idx\) cannot be read"):
        face_nms_filter(cfg, SimpleNamespace(imgidx=None))
