"""Image folder datasets (torchvision's ImageFolder layout) behind every command, on real trees of JPEG and PNG files."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from plugins.face_nms.__main__ import main
from plugins.face_nms.datasets import open_dataset
from plugins.face_nms.demo import TinyNet, synthetic_faces
from plugins.face_nms.extract import extract_features
from plugins.face_nms.features import load_features
from plugins.face_nms.folder_dataset import IMG_EXTENSIONS, FolderDataset, FolderError
from plugins.face_nms.models import TorchModel

# code-point order differs from a depth-first walk: "sub" < "sub dir" < "sub dir/inner" < "sub/x"
PLACES = ["", "sub", "sub dir", "sub dir/inner", "sub/x"]
NAMES = ["id_1", "id 2", "id 10", "Ábel Ñ", "ß-名字", "zeta"]


def write_folder(root, images, labels, names=NAMES):
    """An ImageFolder tree: identity j in folder names[j], its faces as JPEG and PNG (upper-case extensions too)
    spread over nested folders with spaces and unicode, plus files torchvision ignores."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an identity\n")
    for j in np.unique(labels):
        rows = np.flatnonzero(labels == j)
        for n, r in enumerate(rows):
            place = os.path.join(root, names[j], PLACES[n % len(PLACES)])
            os.makedirs(place, exist_ok=True)
            ext = [".jpg", ".png", ".JPG", ".jpeg", ".PNG"][n % 5]
            name = os.path.join(place, f"face {n:03d} ü{ext}")
            Image.fromarray(images[r]).save(name, format="PNG" if ext.lower() == ".png" else "JPEG", quality=95)
        with open(os.path.join(root, names[j], "list.csv"), "w") as f:
            f.write("ignored\n")
    return root


def tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    images, labels, _ = synthetic_faces(n_ids=6, seed=5)
    root = str(tmp_path_factory.mktemp("folders") / "faces set")
    return write_folder(root, images, labels)


def model():
    torch.set_num_threads(1)
    return TorchModel(TinyNet(seed=0), "cpu")


@pytest.fixture(scope="module")
def features(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ffeat") / "features")
    return extract_features(folder, out, model(), batch_size=16, workers=0, chunk_rows=32, progress=False)


def test_labels_and_order_are_torchvisions(folder):
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS as TV_EXTENSIONS
    assert IMG_EXTENSIONS == TV_EXTENSIONS
    tv = ImageFolder(folder)
    ds = open_dataset(folder)
    assert isinstance(ds, FolderDataset) and ds.layout == "folder"
    assert ds.classes == tv.classes == sorted(NAMES)
    assert ds.files == [os.path.relpath(p, folder) for p, _ in tv.samples]
    assert ds.labels.tolist() == tv.targets
    assert np.array_equal(ds.keys, np.arange(len(tv)))
    # the nested order is the sorted walk's, not a depth-first one
    first = [f for f in ds.files if f.startswith(tv.classes[0] + os.sep)]
    places = [os.path.dirname(f)[len(tv.classes[0]) + 1:] for f in first]
    assert list(dict.fromkeys(places)) == sorted(PLACES)
    assert any(f.endswith(".JPG") for f in ds.files) and not any(f.endswith(".csv") for f in ds.files)


def test_folder_features_equal_recordio_features_of_the_same_images(folder, features, tmp_path):
    from plugins.compat import import_mxnet
    mx = import_mxnet()
    ds = open_dataset(folder)
    rec = str(tmp_path / "packed")
    os.makedirs(rec)
    w = mx.recordio.MXIndexedRecordIO(os.path.join(rec, "train.idx"), os.path.join(rec, "train.rec"), "w")
    for i, (name, label) in enumerate(zip(ds.files, ds.labels.tolist())):
        with open(os.path.join(folder, name), "rb") as f:
            w.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), i, 0), f.read()))
    w.close()
    rfeat = extract_features(rec, str(tmp_path / "rf"), model(), batch_size=16, workers=0, chunk_rows=32,
                             progress=False)
    f_folder, l_folder, k_folder, m_folder = load_features(features, folder)
    f_rec, l_rec, _, m_rec = load_features(rfeat, rec)
    assert m_folder["layout"] == "folder" and m_rec["layout"] == "im2rec"
    assert np.array_equal(l_folder, l_rec) and np.array_equal(k_folder, np.arange(len(ds)))
    assert np.abs(f_folder.astype(np.float32) - f_rec.astype(np.float32)).max() < 2e-3
    png = [i for i, n in enumerate(ds.files) if n.lower().endswith(".png")]
    assert png and np.array_equal(f_folder[png], f_rec[png])  # lossless: the same pixels, the same features
    # the host's ImageFolder transform without its flip gives exactly the tensors we feed the model
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    tv = ImageFolder(folder, transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]))
    x = ds.images([3])[0].permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
    assert torch.equal(x[0], tv[3][0])


def test_extraction_resumes_to_the_same_file(folder, features, tmp_path):
    out = str(tmp_path / "f")
    assert extract_features(folder, out, model(), batch_size=16, workers=0, chunk_rows=32, max_chunks=1,
                            progress=False) is None
    assert extract_features(folder, out, model(), batch_size=16, workers=2, chunk_rows=32, progress=False) == out
    assert np.array_equal(np.load(os.path.join(out, "features.npy")), np.load(os.path.join(features, "features.npy")))


def run(argv, capsys):
    capsys.readouterr()
    try:
        main(argv)
        status = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            status = 1
        else:
            status = exc.code or 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return status, cap.out, cap.err.strip().splitlines()


def test_pipeline_on_a_folder_writes_file_lists(folder, features, tmp_path, capsys):
    before = tree_bytes(folder)
    ds = open_dataset(folder)
    status, out, _ = run(["stats", "--rec", folder], capsys)
    assert status == 0 and "folder layout" in out and f"num_image    {len(ds)}" in out
    sub = str(tmp_path / "proxy50.txt")
    assert run(["proxy-subset", "--rec", folder, "--ratio", "0.5", "--out", sub], capsys)[0] == 0
    listed = open(sub, encoding="utf-8").read().splitlines()
    assert set(listed) <= set(ds.files) and listed == sorted(listed, key=ds.files.index)
    assert run(["stats", "--rec", folder, "--index", sub], capsys)[1].count(f"num_image    {len(listed)}") == 1

    sel = str(tmp_path / "facenms60.txt")
    status, out, err = run(["select", "--features", features, "--rec", folder, "--ratio", "0.6", "--out", sel,
                            "--device", "cpu"], capsys)
    assert status == 0, err
    kept = open(sel, encoding="utf-8").read().splitlines()
    info = json.load(open(str(tmp_path / "facenms60.json")))
    assert info["kept"] == len(kept) and info["total"] == len(ds)
    assert info["dataset"]["file_list_sha256"] == ds.provenance()["file_list_sha256"]
    for name in ("facenms60_retention.png", "facenms60_nn_cosine.png", "facenms60.html"):
        assert os.path.getsize(str(tmp_path / name)) > 0
    page = open(str(tmp_path / "facenms60.html"), encoding="utf-8").read()
    assert "data:image/jpeg;base64," in page and kept[0].split(os.sep)[-1] in page
    # the kept files are the selection's rows, by the features' labels
    rows = [ds.files.index(k) for k in kept]
    labels = np.load(os.path.join(features, "labels.npy"))
    assert np.bincount(labels[rows]).tolist() == [int(v) for v in np.bincount(ds.labels[rows])]

    g = str(tmp_path / "proxy.html")
    assert run(["gallery", "--rec", folder, "--features", features, "--index", sub, "--out", g], capsys)[0] == 0
    drop = str(tmp_path / "noconflicts.txt")
    status, out, err = run(["conflicts", "--features", features, "--rec", folder, "--out", str(tmp_path / "c.json"),
                            "--drop", drop, "--threshold", "0.3", "--device", "cpu"], capsys)
    assert status == 0, err
    dropped = json.load(open(str(tmp_path / "c.json")))["drop"]["dropped_faces"]
    assert len(open(drop, encoding="utf-8").read().splitlines()) == len(ds) - dropped
    assert tree_bytes(folder) == before


def test_filter_restricts_torchvisions_imagefolder(folder, features, tmp_path, capsys):
    from torchvision.datasets import ImageFolder
    from plugins.registry import apply_dataset_filter
    from easydict import EasyDict as edict
    sel = str(tmp_path / "s.txt")
    assert run(["select", "--features", features, "--rec", folder, "--ratio", "0.5", "--out", sel, "--device",
                "cpu", "--gallery-ids", "0"], capsys)[0] == 0
    kept = open(sel, encoding="utf-8").read().splitlines()
    cfg = edict(rec=folder, num_image=10 ** 9, dataset_filter="face_nms", face_nms=dict(index=sel))
    tv = apply_dataset_filter(cfg, ImageFolder(folder))
    assert [os.path.relpath(p, folder) for p, _ in tv.samples] == kept and cfg.num_image == len(kept)
    assert tv.targets == [t for _, t in tv.imgs] and tv.imgs is tv.samples
    ds = open_dataset(folder)
    assert tv.targets == ds.labels[[ds.files.index(k) for k in kept]].tolist()

    cfg = edict(rec=folder, num_image=0, dataset_filter="random", face_nms=dict(index=sel, seed=0),
                output=str(tmp_path / "work"))
    rnd = apply_dataset_filter(cfg, ImageFolder(folder))
    written = open(str(tmp_path / "work" / "train_random_seed0.txt"), encoding="utf-8").read().splitlines()
    assert [os.path.relpath(p, folder) for p, _ in rnd.samples] == written and cfg.num_image == len(kept)
    assert np.array_equal(np.bincount(rnd.targets), np.bincount(tv.targets))
    cfg = edict(rec=folder, num_image=0, dataset_filter="random", face_nms=dict(ratio=0.5, seed=1),
                output=str(tmp_path / "work"))
    assert len(apply_dataset_filter(cfg, ImageFolder(folder))) == cfg.num_image == round(0.5 * len(ds))
    for seed in ("abc", 1.7, -1, True):
        cfg = edict(rec=folder, num_image=0, dataset_filter="random", face_nms=dict(ratio=0.5, seed=seed),
                    output=str(tmp_path / "work"))
        with pytest.raises(ValueError, match=r"config.face_nms\['seed'\] must be a whole number >= 0"):
            apply_dataset_filter(cfg, ImageFolder(folder))


def test_filter_refuses_a_list_of_another_folder(folder, tmp_path):
    from torchvision.datasets import ImageFolder
    from plugins.registry import apply_dataset_filter
    from easydict import EasyDict as edict
    other = str(tmp_path / "other.txt")
    with open(other, "w") as f:
        f.write("id_1/face 000 ü.jpg\nsomeone/else.jpg\n")
    cfg = edict(rec=folder, dataset_filter="face_nms", face_nms=dict(index=other))
    with pytest.raises(FolderError, match=r"other.txt does not belong to .*line 2 \('someone/else.jpg'\)"):
        apply_dataset_filter(cfg, ImageFolder(folder))


def test_features_of_a_changed_folder_are_refused(features, tmp_path, folder):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)  # names, sizes and mtimes kept: the same dataset
    assert load_features(features, copy)[3]["count"] == len(open_dataset(folder))
    name = open_dataset(copy).files[7]
    os.utime(os.path.join(copy, name), ns=(0, 10 ** 18))
    with pytest.raises(ValueError, match=r"copy: file_list_sha256 \("):
        load_features(features, copy)


# ---- bad inputs: one line each ----

def one_line(status, lines, want, *words):
    assert status == want, lines
    assert len(lines) == 1, lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def small_tree(root, n=2):
    images, labels, _ = synthetic_faces(n_ids=2, seed=1)
    return write_folder(str(root), images[:12], labels[:12] * 0 + np.arange(12) % n, names=["a", "b"])


def test_folder_with_no_identities(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.rec").write_bytes(b"")  # no train.idx: the host reads a folder
    status, _, lines = run(["stats", "--rec", str(tmp_path / "empty")], capsys)
    one_line(status, lines, 1, "empty/train.idx not found beside train.rec", "no identity sub-folders")
    os.remove(str(tmp_path / "empty" / "train.rec"))
    status, _, lines = run(["stats", "--rec", str(tmp_path / "empty")], capsys)
    one_line(status, lines, 1, "empty holds no train.rec + train.idx and no identity sub-folders")


def test_identity_folder_without_images(tmp_path, capsys):
    root = small_tree(tmp_path / "t")
    os.makedirs(os.path.join(root, "c", "deeper"))
    open(os.path.join(root, "c", "deeper", "readme.txt"), "w").close()
    status, _, lines = run(["stats", "--rec", root], capsys)
    one_line(status, lines, 1, f"{root}/c holds no image", "ImageFolder refuses it too")


def test_dangling_image_link(tmp_path, capsys):
    root = small_tree(tmp_path / "t")
    os.symlink("/nonexistent/x.jpg", os.path.join(root, "a", "gone.jpg"))
    status, _, lines = run(["stats", "--rec", root], capsys)
    one_line(status, lines, 1, f"{root}/a/gone.jpg is a link to nothing")


def test_link_loop(tmp_path, capsys):
    root = small_tree(tmp_path / "t")
    os.symlink("..", os.path.join(root, "a", "sub", "up"))
    status, _, lines = run(["stats", "--rec", root], capsys)
    one_line(status, lines, 1, f"{root}/a/sub/up links back to a folder above it", "remove the link")


def test_undecodable_and_wrong_size_images(tmp_path):
    from plugins.face_nms.guards import describe
    root = small_tree(tmp_path / "t")
    with open(os.path.join(root, "b", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError) as e:
        extract_features(root, str(tmp_path / "f"), model(), batch_size=4, workers=0, chunk_rows=4, progress=False)
    msg = describe(e.value)
    assert "\n" not in msg and f"{root}/b/broken.jpg cannot be decoded" in msg
    os.remove(os.path.join(root, "b", "broken.jpg"))
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(os.path.join(root, "b", "big.png"))
    with pytest.raises(ValueError) as e:
        extract_features(root, str(tmp_path / "g"), model(), batch_size=4, workers=0, chunk_rows=4, progress=False)
    msg = describe(e.value)
    assert "\n" not in msg and f"{root}/b/big.png is 120x100, not 112x112" in msg and "does not resize" in msg


@pytest.mark.parametrize("command", ["proxy-subset", "select", "extract", "conflicts-drop"])
def test_no_output_inside_the_image_folder(folder, features, tmp_path, capsys, command):
    before = tree_bytes(folder)
    inside = os.path.join(folder, "id_1", "out.txt")
    argv = {"proxy-subset": ["proxy-subset", "--rec", folder, "--ratio", "0.5", "--out", inside],
            "select": ["select", "--features", features, "--rec", folder, "--ratio", "0.5", "--out", inside],
            "extract": ["extract", "--rec", folder, "--out", os.path.join(folder, "features"), "--onnx", "m.onnx",
                        "--device", "cpu"],
            "conflicts-drop": ["conflicts", "--features", features, "--rec", folder, "--out",
                               str(tmp_path / "c.json"), "--drop", inside, "--device", "cpu"]}[command]
    status, _, lines = run(argv, capsys)
    one_line(status, lines, 2, f"is inside the image folder {folder}", "outside it")
    assert tree_bytes(folder) == before


def test_a_folder_set_is_named_txt(folder, tmp_path, capsys):
    status, _, lines = run(["proxy-subset", "--rec", folder, "--ratio", "0.5", "--out", str(tmp_path / "p.idx")],
                           capsys)
    one_line(status, lines, 2, "p.idx: a filtered set of the image folder", "name it .txt")


def _shard_worker(rank, world, port, root, out):
    import gloo_group
    gloo_group.join(rank, world, port)
    extract_features(root, out, model(), batch_size=8, workers=0, chunk_rows=16, progress=False)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_write_the_single_process_file(folder, features, tmp_path):
    import gloo_group
    import torch.multiprocessing as mp
    out = str(tmp_path / "sharded")
    mp.spawn(_shard_worker, args=(2, gloo_group.free_port(), folder, out), nprocs=2, join=True)
    assert np.array_equal(np.load(os.path.join(features, "features.npy")), np.load(os.path.join(out, "features.npy")))
    assert np.array_equal(np.load(os.path.join(features, "labels.npy")), np.load(os.path.join(out, "labels.npy")))


def test_overlap_exclusion_of_a_folder_is_a_file_list_the_filter_takes(tmp_path, capsys):
    from torchvision.datasets import ImageFolder
    from easydict import EasyDict as edict
    from plugins.face_nms.models import OnnxModel
    from plugins.registry import apply_dataset_filter
    from test_overlap import PoolNet, _onnx, write_bin
    images, labels, _ = synthetic_faces(n_ids=6, seed=11, burst_every=1000)
    root = write_folder(str(tmp_path / "faces"), images, labels)
    onnx = _onnx(PoolNet(), str(tmp_path / "pool.onnx"))
    feats = extract_features(root, str(tmp_path / "f"), OnnxModel(onnx, "cpu"), batch_size=32, workers=0,
                             progress=False)
    ds = open_dataset(root)
    shown = [r for r in range(len(ds)) if ds.labels[r] == 2][:4]  # faces of identity 2 in the evaluation set
    from plugins.face_nms.decode import decode_image_file
    lfw = write_bin(tmp_path / "lfw.bin", [decode_image_file(os.path.join(root, ds.files[r])) for r in shown])
    exclude = str(tmp_path / "no_overlap.txt")
    status, out, err = run(["overlap", "--features", feats, "--rec", root, "--onnx", onnx, "--bin", lfw,
                            "--device", "cpu", "--threshold", "0.7", "--out", str(tmp_path / "o.json"),
                            "--exclude", exclude], capsys)
    assert status == 0, err
    report = json.load(open(str(tmp_path / "o.json")))
    assert 2 in report["totals"]["labels"]
    kept = open(exclude, encoding="utf-8").read().splitlines()
    gone = set(report["totals"]["labels"])
    assert kept == [f for f, y in zip(ds.files, ds.labels.tolist()) if y not in gone]
    cfg = edict(rec=root, num_image=0, dataset_filter="face_nms", face_nms=dict(index=exclude))
    tv = apply_dataset_filter(cfg, ImageFolder(root))
    assert [os.path.relpath(p, root) for p, _ in tv.samples] == kept and cfg.num_image == len(kept)


@pytest.mark.parametrize("where", ["identity", "nested"])
def test_line_break_in_a_folder_name(tmp_path, capsys, where):
    root = small_tree(tmp_path / "t")
    bad = os.path.join(root, "a\nb") if where == "identity" else os.path.join(root, "a", "sub\rdir")
    os.rename(os.path.join(root, "a"), bad) if where == "identity" else os.rename(os.path.join(root, "a", "sub"), bad)
    status, _, lines = run(["stats", "--rec", root], capsys)
    one_line(status, lines, 1, repr(bad), "line break in its name", "rename it")


def test_a_filtered_set_with_crlf_line_ends(tmp_path, capsys):
    root = small_tree(tmp_path / "t")
    lf = str(tmp_path / "lf.txt")
    assert run(["proxy-subset", "--rec", root, "--ratio", "0.5", "--out", lf], capsys)[0] == 0
    crlf = str(tmp_path / "crlf.txt")
    with open(lf, "rb") as f, open(crlf, "wb") as g:
        g.write(f.read().replace(b"\n", b"\r\n"))
    ds = open_dataset(root, progress=False)
    assert np.array_equal(ds.subset_rows(crlf), ds.subset_rows(lf)) and len(ds.subset_rows(lf)) == 6


def test_no_output_into_a_linked_identity_folder(tmp_path, capsys):
    root = small_tree(tmp_path / "t")
    elsewhere = str(tmp_path / "elsewhere")
    os.rename(os.path.join(root, "b"), elsewhere)
    os.symlink(elsewhere, os.path.join(root, "b"))
    before = tree_bytes(elsewhere)
    for out in (os.path.join(elsewhere, "p.txt"), os.path.join(elsewhere, "new", "p.txt")):
        status, _, lines = run(["proxy-subset", "--rec", root, "--ratio", "0.5", "--out", out], capsys)
        one_line(status, lines, 2, f"is inside the image folder {root}", "outside it")
    assert tree_bytes(elsewhere) == before and not os.path.exists(os.path.join(elsewhere, "new"))


def test_a_deeply_nested_identity_is_listed(tmp_path, capsys):
    root = small_tree(tmp_path / "t")
    deep = os.path.join(root, "a")
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(sys.getrecursionlimit() + 50):  # deeper than a recursive walk reaches, within PATH_MAX
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
        f.write(open(os.path.join(root, "b", "face 000 ü.jpg"), "rb").read())
    os.close(fd)
    try:
        _check_deep(root)
    finally:  # bottom up: pytest's clean-up (a recursive rmtree) cannot remove so deep a tree
        levels = sys.getrecursionlimit() + 50
        os.remove(os.path.join(deep, *["d"] * levels, "deep.jpg"))
        for n in range(levels, 0, -1):
            os.rmdir(os.path.join(deep, *["d"] * n))


def _check_deep(root):
    ds = open_dataset(root, progress=False)
    deep_rows = [i for i, name in enumerate(ds.files) if name.endswith("/d/deep.jpg")]
    assert len(ds) == 13 and len(deep_rows) == 1 and ds.labels.tolist() == [0] * 7 + [1] * 6
    assert ds.labels[deep_rows[0]] == 0 and ds.files == sorted(ds.files[:7], key=lambda n: os.path.dirname(n)) + \
        ds.files[7:]


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path):
    import subprocess
    root = small_tree(tmp_path / "t")
    r, w = os.pipe()
    os.close(r)  # a reader that stopped, as `| head -1` does
    p = subprocess.run([sys.executable, "-m", "plugins.face_nms", "stats", "--rec", root], stdout=w,
                       stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.close(w)
    assert p.returncode == 141 and "error" not in p.stderr and "Broken pipe" not in p.stderr, p.stderr


def test_pages_of_a_folder_with_names_that_are_not_utf8(tmp_path, capsys):
    root = small_tree(tmp_path / "t")
    os.rename(os.fsencode(os.path.join(root, "a", "face 000 ü.jpg")), os.fsencode(os.path.join(root, "a")) + b"/f\xfe.jpg")
    feats = extract_features(root, str(tmp_path / "f"), model(), batch_size=16, workers=0, chunk_rows=32,
                             progress=False)
    out = str(tmp_path / "s.txt")
    status, _, lines = run(["select", "--features", feats, "--rec", root, "--ratio", "0.5", "--out", out,
                            "--device", "cpu"], capsys)
    assert status == 0, lines
    assert os.fsencode(os.path.join(root, "a")) + b"/f\xfe.jpg" in [os.fsencode(os.path.join(root, p)) for p in
                                                                   FolderDataset(root, progress=False).files]
    page = open(str(tmp_path / "s.html"), encoding="utf-8").read()
    assert "a/f\\xfe.jpg" in page
    status, _, lines = run(["gallery", "--rec", root, "--features", feats, "--index", out, "--out",
                            str(tmp_path / "g.html")], capsys)
    assert status == 0 and "a/f\\xfe.jpg" in open(str(tmp_path / "g.html"), encoding="utf-8").read(), lines


def test_filtered_set_lines_that_are_not_relative_image_paths_say_what_they_are(tmp_path):
    from plugins.face_nms.folder_dataset import FolderDataset, FolderError
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((112, 112, 3), 40 * i + (c == "b") * 100, np.uint8)).save(root / c / f"{i}.png")
    ds = FolderDataset(str(root), progress=False)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa/0.png\nb/1.png\n".encode("utf-8"))
    assert [ds.files[r] for r in ds.subset_rows(str(bom))] == ["a/0.png", "b/1.png"]
    for text, says in ((f"{root}/a/0.png\n", "is not a path relative to the image folder"),
                       ("a/../a/0.png\n", "is not a path relative to the image folder"),
                       ("0\t0\n1\t120\n", "it is an MXNet index of a RecordIO dataset")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(FolderError, match=says):
            ds.subset_rows(str(bad))
