"""Tests against a real arcface_torch checkout: set INSIGHTFACE_DIR to an untouched insightface checkout.

Each test works on a copy of recognition/arcface_torch in a temporary folder, never on the checkout.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from plugins.face_nms.demo import synthetic_faces, write_recordio
from plugins.face_nms.recordio_index import read_idx, read_index, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSIGHTFACE_DIR = os.environ.get("INSIGHTFACE_DIR")
if not INSIGHTFACE_DIR:
    pytest.skip("INSIGHTFACE_DIR is not set: host tests need an insightface checkout "
                "(INSIGHTFACE_DIR=/path/to/insightface python -m pytest tests)", allow_module_level=True)
HOST_AT = os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_torch")


def tree(path):
    """{relative path: sha256 or link target} of every file under path."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


PINNED = "insightface commit 0159b24d"


def install(*args, repo=ROOT):
    return subprocess.run(["bash", os.path.join(repo, "install.sh"), *args], capture_output=True, text=True)


def pristine_copy(src_at, root):
    """Copies arcface_torch from src_at to root/recognition/arcface_torch and makes the copy pristine.

    An INSIGHTFACE_DIR that install.sh installed into is uninstalled in the copy. Returns None, or why
    the copy cannot be made pristine (the tests skip with that reason).
    """
    if not os.path.isfile(os.path.join(src_at, "train_v2.py")):
        return f"{src_at}/train_v2.py not found: INSIGHTFACE_DIR must be the root of an insightface checkout"
    at = os.path.join(root, "recognition", "arcface_torch")
    shutil.copytree(src_at, at, ignore=shutil.ignore_patterns("__pycache__", "work_dirs"), symlinks=True)
    if os.path.exists(os.path.join(at, ".arcface-plugins-manifest")):
        r = install("--uninstall", root)
        if r.returncode != 0:
            return f"{src_at} holds an install that cannot be undone in a copy: {r.stderr.strip().replace(at, src_at)}"
        # a recipe edited after install is kept by --uninstall; in the copy it is not the host's file
        for c in os.listdir(os.path.join(ROOT, "configs")):
            if os.path.isfile(os.path.join(at, "configs", c)):
                os.remove(os.path.join(at, "configs", c))
    for line in open(os.path.join(ROOT, "patches", "host.sha256")):
        if line.startswith("#") or not line.strip():
            continue
        want, path, state = line.split()
        p = os.path.join(at, path)
        if state == "pristine" and (not os.path.isfile(p) or hashlib.sha256(open(p, "rb").read()).hexdigest() != want):
            return (f"{src_at}/{path} is not the file of {PINNED} (sha256 differs or missing); "
                    f"host tests need that checkout, pristine or installed by install.sh")
    if os.path.lexists(os.path.join(at, "plugins")):
        return f"{src_at}/plugins exists but the install manifest does not: move it away to run the host tests"
    return None


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """A pristine copy of INSIGHTFACE_DIR's arcface_torch, made once; tests copy it again."""
    root = str(tmp_path_factory.mktemp("pristine"))
    why = pristine_copy(HOST_AT, root)
    if why:
        pytest.skip(why)
    return os.path.join(root, "recognition", "arcface_torch")


@pytest.fixture
def host(pristine, tmp_path):
    root = tmp_path / "insightface"
    at = root / "recognition" / "arcface_torch"
    shutil.copytree(pristine, at, symlinks=True)
    return str(root), str(at)


@pytest.fixture
def installed(host):
    r = install("--no-deps", host[0])
    assert r.returncode == 0, r.stderr
    return host


def run_in(at, code, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=at, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


def test_install_is_idempotent_and_uninstall_restores_every_byte(host):
    root, at = host
    before = tree(at)
    r = install("--no-deps", root)
    assert r.returncode == 0, r.stderr
    after = tree(at)
    assert after["plugins"] == "link:" + os.path.join(ROOT, "plugins")
    ours = sorted(os.listdir(os.path.join(ROOT, "configs")))
    assert all(f"configs/{c}" in after for c in ours)
    changed = {p for p in before if after.get(p) != before[p]}
    assert changed == {"train_v2.py", "dataset.py", "lr_scheduler.py"}, "only the patched files change"
    r2 = install("--no-deps", root)
    assert r2.returncode == 0 and "nothing to do" in r2.stdout
    assert tree(at) == after
    r3 = install("--uninstall", root)
    assert r3.returncode == 0, r3.stderr
    assert tree(at) == before


def test_an_installed_checkout_gives_the_same_pristine_copy(installed, pristine, tmp_path):
    root, at = installed
    with open(os.path.join(at, "configs", sorted(os.listdir(os.path.join(ROOT, "configs")))[0]), "a") as f:
        f.write("# edited after install\n")
    before = tree(at)
    assert pristine_copy(at, str(tmp_path / "again")) is None
    assert tree(at) == before, "the checkout given is never modified"
    assert tree(str(tmp_path / "again" / "recognition" / "arcface_torch")) == tree(pristine)


def test_refuses_a_modified_host_file_and_changes_nothing(host):
    root, at = host
    with open(os.path.join(at, "dataset.py"), "a") as f:
        f.write("\n# local change\n")
    before = tree(at)
    r = install("--no-deps", root)
    assert r.returncode != 0
    assert "dataset.py" in r.stderr and "Nothing was changed" in r.stderr
    assert tree(at) == before


def test_refuses_to_overwrite_a_host_config(host):
    root, at = host
    name = sorted(os.listdir(os.path.join(ROOT, "configs")))[0]
    with open(os.path.join(at, "configs", name), "w") as f:
        f.write("config = None\n")
    before = tree(at)
    r = install("--no-deps", root)
    assert r.returncode != 0 and name in r.stderr
    assert tree(at) == before


def test_recipes_load_with_the_host_config_loader(installed):
    _, at = installed
    names = sorted(c[:-3] for c in os.listdir(os.path.join(ROOT, "configs")))
    out = run_in(at, f"""
        import json
        from utils.utils_config import get_config
        print(json.dumps({{n: dict(get_config("configs/%s.py" % n)) for n in {names!r}}}, default=str))
        """)
    cfgs = json.loads(out)
    fast = {n: c for n, c in cfgs.items() if "fastface" in n}
    assert len(fast) == 8
    for c in fast.values():
        assert c["lr_scheduler"] == "fastface" and c["num_epoch"] == 5
    for n in ("ms1mv3_r100_fastface", "wf4m_r100_fastface", "wf8m_r100_fastface", "wf12m_r100_fastface",
              "wf12m_r50_fastface"):
        assert cfgs[n]["batch_size"] == 128 and cfgs[n]["lr"] == 0.02
    nms = {n: c for n, c in cfgs.items() if "facenms" in n}
    assert len(nms) == 6 and all(c["dataset_filter"] == "face_nms" for c in nms.values())
    folder = cfgs["wf42m_folder_r100_facenms60"]
    assert folder["face_nms"]["index"].endswith(".txt") and not folder["dali"]
    assert {k: v for k, v in folder.items() if k not in ("rec", "face_nms", "output")} == \
        {k: v for k, v in cfgs["wf42m_pfc02_r100_facenms60"].items() if k not in ("rec", "face_nms", "output")}


def test_default_config_builds_the_host_polynomial_scheduler(installed):
    _, at = installed
    out = run_in(at, """
        import json, torch
        from utils.utils_config import get_config
        from lr_scheduler import PolynomialLRWarmup
        from plugins.registry import build_lr_scheduler, step_lr_scheduler
        def trajectory(make):
            p = [torch.nn.Parameter(torch.zeros(1))]
            opt = torch.optim.SGD([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1)
            s = make(opt)
            lrs = []
            for _ in range(120):
                opt.step(); step_lr_scheduler(s, 1.0); lrs.append(s.get_last_lr())
            return type(s).__name__, lrs
        cfg = get_config("configs/ms1mv3_r50_onegpu.py")
        assert "lr_scheduler" not in cfg
        cfg.warmup_step, cfg.total_step = 10, 100
        a = trajectory(lambda o: build_lr_scheduler(cfg, o))
        b = trajectory(lambda o: PolynomialLRWarmup(optimizer=o, warmup_iters=10, total_iters=100))
        cfg.lr_scheduler = "fastfcae"
        try:
            build_lr_scheduler(cfg, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
        except KeyError as e:
            err = str(e)
        print(json.dumps({"a": a, "b": b, "err": err}))
        """)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["a"][0] == "PolynomialLRWarmup"
    assert res["a"] == res["b"]
    assert res["a"][1][9][0] == pytest.approx(0.1) and res["a"][1][-1][0] == 0.0
    assert "fastfcae" in res["err"] and "fastface" in res["err"] and "polynomial" in res["err"]


@pytest.fixture(scope="module", params=["insightface", "im2rec"])
def small_rec(request, tmp_path_factory):
    images, labels, _ = synthetic_faces(n_ids=8, seed=4)
    d = str(tmp_path_factory.mktemp(request.param))
    write_recordio(d, images, labels, request.param, shuffle_seed=1)
    return d


def test_face_nms_filter_on_the_host_dataset(installed, small_rec, tmp_path):
    _, at = installed
    index = read_index(small_rec)
    rows = np.sort(np.random.default_rng(0).choice(len(index), len(index) * 3 // 5, replace=False))
    idx = str(tmp_path / "train_facenms60.idx")
    write_idx(idx, index.keys[rows], index.offsets[rows])
    out = run_in(at, f"""
        import json
        from easydict import EasyDict as edict
        from dataset import MXFaceDataset
        from plugins.registry import apply_dataset_filter
        cfg = edict(rec={small_rec!r}, num_image=10 ** 9, dataset_filter="face_nms",
                    face_nms=dict(index={idx!r}, trust_index=True))  # written here, without a summary
        ds = apply_dataset_filter(cfg, MXFaceDataset(root_dir=cfg.rec, local_rank=0))
        labels = [int(ds[i][1]) for i in range(len(ds))]
        shapes = sorted({{tuple(ds[i][0].shape) for i in range(3)}})
        print(json.dumps({{"keys": [int(k) for k in ds.imgidx], "labels": labels, "num_image": cfg.num_image,
                          "train_idx": cfg.train_idx, "shapes": shapes, "type": type(ds).__name__}}))
        """)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["type"] == "MXFaceDataset"
    assert res["keys"] == index.keys[rows].tolist()
    assert res["labels"] == index.labels[rows].tolist()
    assert res["num_image"] == len(rows) and res["train_idx"] == idx
    assert res["shapes"] == [[3, 112, 112]]


def test_face_nms_filter_list_on_the_host_dataset(installed, small_rec, tmp_path):
    """config.face_nms = dict(index=[a, b]): the host's MXFaceDataset yields the records in both (indexes
    written here without summaries: trust_index=True)."""
    _, at = installed
    index = read_index(small_rec)
    paths, masks = [], []
    for seed in (0, 1):
        rows = np.sort(np.random.default_rng(seed).choice(len(index), len(index) * 4 // 5, replace=False))
        paths.append(write_idx(str(tmp_path / f"i{seed}.idx"), index.keys[rows], index.offsets[rows]))
        masks.append(np.isin(index.keys, index.keys[rows]))
    keep = masks[0] & masks[1]
    out = run_in(at, f"""
        import json
        from easydict import EasyDict as edict
        from dataset import MXFaceDataset
        from plugins.registry import apply_dataset_filter
        cfg = edict(rec={small_rec!r}, num_image=10 ** 9, dataset_filter="face_nms",
                    face_nms=dict(index={paths!r}, trust_index=True), output={str(tmp_path / "run")!r})
        ds = apply_dataset_filter(cfg, MXFaceDataset(root_dir=cfg.rec, local_rank=0))
        labels = [int(ds[i][1]) for i in range(len(ds))]
        print(json.dumps({{"keys": [int(k) for k in ds.imgidx], "labels": labels, "num_image": cfg.num_image,
                          "train_idx": cfg.train_idx}}))
        """)
    res = json.loads(out.strip().splitlines()[-1])
    assert 0 < keep.sum() < min(m.sum() for m in masks)
    assert res["keys"] == index.keys[keep].tolist() and res["labels"] == index.labels[keep].tolist()
    assert res["num_image"] == int(keep.sum()) and res["train_idx"] == str(tmp_path / "run" / "train_combined.idx")
    assert read_idx(res["train_idx"])[0].tolist() == res["keys"]


def test_mismatched_index_fails_at_start(installed, small_rec, tmp_path):
    _, at = installed
    bad = str(tmp_path / "other.idx")
    write_idx(bad, [5, 6], [12345, 99999])
    code = f"""
        from easydict import EasyDict as edict
        from dataset import MXFaceDataset
        from plugins.registry import apply_dataset_filter
        cfg = edict(rec={small_rec!r}, dataset_filter="face_nms", face_nms=dict(index={bad!r}))
        apply_dataset_filter(cfg, MXFaceDataset(root_dir=cfg.rec, local_rank=0))
        """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=at, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "other.idx" in r.stderr and "does not belong" in r.stderr


CPU_RUN = """
# A short CPU run of the host's own training pieces. The host calls .cuda() and uses CUDA streams
# everywhere (train_v2.py, PartialFC_V2, DataLoaderX); inside this test only, those calls are made
# no-ops so the real classes run on the CPU.
import contextlib, json, os, sys, torch
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.set_device = lambda *a, **k: None
class _Stream:
    def __init__(self, *a, **k): pass
    def wait_stream(self, other): pass
torch.cuda.Stream = _Stream
torch.cuda.current_stream = lambda *a, **k: _Stream()
torch.cuda.stream = lambda s: contextlib.nullcontext()
torch.set_num_threads(2)

# a file rendezvous: no TCP port to collide with other runs on the machine
torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(OUT, "rendezvous"), rank=0, world_size=1)

from backbones import get_model
from dataset import get_dataloader
from losses import CombinedMarginLoss
from partial_fc_v2 import PartialFC_V2
from utils.utils_config import get_config
from plugins.registry import build_lr_scheduler, step_lr_scheduler, log_lr_scheduler

cfg = get_config("configs/ms1mv3_r100_fastface.py")
cfg.rec, cfg.network, cfg.batch_size, cfg.num_classes, cfg.fp16 = REC, "r18", 8, NUM_CLASSES, False
cfg.num_image, cfg.num_epoch, cfg.lr = 10 ** 9, 1, 0.1
cfg.dataset_filter, cfg.face_nms = "face_nms", dict(index=INDEX, trust_index=True)  # an index without a summary
cfg.fastface = dict(threshold=1e9, tolerance=0.01, max_decays=3, reference_start=True)  # T = 0: decays visible
loader = get_dataloader(cfg.rec, "cpu", cfg.batch_size, False, False, cfg.seed, 0, cfg=cfg)
cfg.total_step = cfg.num_image // cfg.batch_size * cfg.num_epoch

backbone = get_model(cfg.network, dropout=0.0, fp16=False, num_features=cfg.embedding_size)
backbone.train()
margin = CombinedMarginLoss(64, *cfg.margin_list, cfg.interclass_filtering_threshold)
pfc = PartialFC_V2(margin, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False)
opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": pfc.parameters()}],
                      lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
sched = build_lr_scheduler(cfg, opt)

from torch.utils.tensorboard import SummaryWriter
writer = SummaryWriter(log_dir=os.path.join(OUT, "tb"))
losses, lrs, labels_seen = [], [], []
step = 0
for img, labels in loader:
    step += 1
    labels_seen += labels.tolist()
    loss = pfc(backbone(img), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
    opt.step(); opt.zero_grad()
    loss_value = loss.item()
    step_lr_scheduler(sched, loss_value)
    log_lr_scheduler(writer, sched, step, 2)
    losses.append(loss_value); lrs.append([g["lr"] for g in opt.param_groups])
writer.close()
print(json.dumps({"losses": losses, "lrs": lrs, "num_image": cfg.num_image, "total_step": cfg.total_step,
                  "labels": labels_seen, "sched": type(sched).__name__, "decays": sched.decays}))
"""


def test_short_cpu_training_run_with_fastface(installed, tmp_path):
    _, at = installed
    images, labels, _ = synthetic_faces(n_ids=6, seed=8)
    rec = str(tmp_path / "rec")
    write_recordio(rec, images, labels, "im2rec", shuffle_seed=2)
    index = read_index(rec)
    keep = np.arange(0, len(index), 2)[:40]
    idx = str(tmp_path / "kept.idx")
    write_idx(idx, index.keys[keep], index.offsets[keep])
    code = (f"REC, INDEX, OUT, NUM_CLASSES = {rec!r}, {idx!r}, {str(tmp_path)!r}, {int(labels.max()) + 1}\n"
            + CPU_RUN)
    res = json.loads(run_in(at, code).strip().splitlines()[-1])
    assert res["sched"] == "FastFace"
    assert res["num_image"] == len(keep) and res["total_step"] == len(keep) // 8
    assert len(res["losses"]) == len(keep) // 8 and all(np.isfinite(res["losses"]))
    # only kept records are read (drop_last leaves out the last partial batch)
    seen, kept = np.bincount(res["labels"], minlength=8), np.bincount(index.labels[keep], minlength=8)
    assert len(res["labels"]) == len(keep) // 8 * 8 and np.all(seen <= kept)
    # FastFace on the real loss values: the LR follows the recurrence (decided at step 2, applied at 3)
    from test_fastface import reference_lrs
    want = reference_lrs(res["losses"], 0.1, res["total_step"], threshold=1e9, tolerance=0.01, max_decays=3)
    assert [lr[0] for lr in res["lrs"]] == pytest.approx(want)
    assert [lr[1] for lr in res["lrs"]] == pytest.approx(want)
    assert res["decays"] >= 1
    events = os.listdir(os.path.join(tmp_path, "tb"))
    assert events and events[0].startswith("events.out.tfevents")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(tmp_path, "tb"))
    acc.Reload()
    assert {"fastface/d_ema", "fastface/stagnation", "fastface/decays"} <= set(acc.Tags()["scalars"])


def test_patched_train_v2_uses_the_registry(installed):
    _, at = installed
    src = open(os.path.join(at, "train_v2.py")).read()
    compile(src, "train_v2.py", "exec")
    assert "build_lr_scheduler(cfg, opt)" in src and "step_lr_scheduler(lr_scheduler, loss_value)" in src
    assert src.count("loss.item()") == 2  # wandb's read stays; the scheduler and logging share loss_value


FOLDER_RUN = """
# get_dataloader's ImageFolder branch, patched, on the CPU: its DataLoaderX uses CUDA streams, made no-ops here
import contextlib, json, os, torch
torch.cuda.set_device = lambda *a, **k: None
class _Stream:
    def __init__(self, *a, **k): pass
    def wait_stream(self, other): pass
torch.cuda.Stream = _Stream
torch.cuda.current_stream = lambda *a, **k: _Stream()
torch.cuda.stream = lambda s: contextlib.nullcontext()
from easydict import EasyDict as edict
from dataset import get_dataloader
cfg = edict(rec=ROOT, num_image=10 ** 9, dataset_filter="face_nms", face_nms=dict(index=INDEX))
loader = get_dataloader(cfg.rec, "cpu", 4, False, False, 2048, 0, cfg=cfg)
ds = loader.dataset
labels = [int(y) for _, y in loader for y in y]
x, _ = ds[0]
print(json.dumps({"type": type(ds).__name__, "files": [os.path.relpath(p, ROOT) for p, _ in ds.samples],
                  "targets": ds.targets, "num_image": cfg.num_image, "labels": labels, "shape": list(x.shape)}))
"""


def test_folder_selection_trains_through_the_patched_get_dataloader(installed, tmp_path):
    from plugins.face_nms.__main__ import main
    from plugins.face_nms.datasets import open_dataset
    from plugins.face_nms.demo import TinyNet
    from plugins.face_nms.extract import extract_features
    from plugins.face_nms.models import TorchModel
    from test_folders import write_folder
    _, at = installed
    images, labels, _ = synthetic_faces(n_ids=5, seed=9)
    root = write_folder(str(tmp_path / "faces"), images, labels)
    feats = extract_features(root, str(tmp_path / "f"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=16,
                             workers=0, progress=False)
    sel = str(tmp_path / "facenms60.txt")
    main(["select", "--features", feats, "--rec", root, "--ratio", "0.6", "--out", sel, "--device", "cpu",
          "--gallery-ids", "0"])
    kept = open(sel, encoding="utf-8").read().splitlines()
    res = json.loads(run_in(at, f"ROOT, INDEX = {root!r}, {sel!r}\n" + FOLDER_RUN).strip().splitlines()[-1])
    ds = open_dataset(root)
    assert res["type"] == "ImageFolder" and res["files"] == kept and res["num_image"] == len(kept)
    assert res["targets"] == ds.labels[[ds.files.index(k) for k in kept]].tolist()
    assert res["shape"] == [3, 112, 112]
    # one epoch reads only kept files (drop_last leaves out the last partial batch)
    assert len(res["labels"]) == len(kept) // 4 * 4
    assert np.all(np.bincount(res["labels"], minlength=5) <= np.bincount(res["targets"], minlength=5))
