"""mxnet 1.9.1 and the host's scheduler on the numpy, Python and torch releases install.sh supports."""
import inspect
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict

from plugins.compat import _pack_with_tobytes, import_mxnet
from plugins.registry import build_lr_scheduler, step_lr_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSIGHTFACE_DIR = os.environ.get("INSIGHTFACE_DIR")
if INSIGHTFACE_DIR:
    from test_host import pristine  # noqa: E402,F401  (fixture: a pristine copy of the host's arcface_torch)
needs_host = pytest.mark.skipif(not INSIGHTFACE_DIR, reason="INSIGHTFACE_DIR is not set: the scheduler tests need "
                                "an insightface checkout (INSIGHTFACE_DIR=/path/to/insightface python -m pytest tests)")


def test_mxnet_recordio_round_trip_with_this_numpy(tmp_path):
    import cv2
    mx = import_mxnet()
    img = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    img[:56] = 40  # a flat half so that JPEG keeps it exactly enough to compare
    idx, rec = str(tmp_path / "train.idx"), str(tmp_path / "train.rec")
    w = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [3, 5], 0, 0), b""))
    w.write_idx(1, mx.recordio.pack(mx.recordio.IRHeader(0, 7.0, 1, 0), cv2.imencode(".jpg", img)[1].tobytes()))
    w.close()
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    head, _ = mx.recordio.unpack(r.read_idx(0))
    assert head.flag == 2 and list(head.label) == [3.0, 5.0]
    head, payload = mx.recordio.unpack(r.read_idx(1))
    assert (head.flag, head.label, head.id) == (0, 7.0, 1)
    decoded = mx.image.imdecode(payload).asnumpy()
    assert decoded.shape == (112, 112, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded[:48].astype(int) - 40).max() <= 2


def test_pack_writes_the_recordio_header_without_tostring():
    mx = import_mxnet()
    pack = _pack_with_tobytes(mx.recordio)
    many = struct.pack("IfQQ", 2, 0.0, 4, 0) + np.float32([3, 5]).tobytes() + b"abc"
    one = struct.pack("IfQQ", 0, 7.0, 9, 0) + b"x"
    assert pack(mx.recordio.IRHeader(0, [3, 5], 4, 0), b"abc") == many
    assert pack(mx.recordio.IRHeader(1, 7.0, 9, 0), b"x") == one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy < 2.3: tostring is deprecated
        # mxnet's own pack where numpy has tostring, ours where it has not: the same bytes
        assert mx.recordio.pack(mx.recordio.IRHeader(0, [3, 5], 4, 0), b"abc") == many
    # ours: from plugins.compat, or from its copy in mxnet-compat-hook where install.sh installed that
    assert getattr(mx.recordio.pack, "_tobytes", False) == (not hasattr(np.ndarray, "tostring"))
    assert mx.recordio.pack.__module__ in (("plugins.compat", "mxnet_compat_hook.compat")
                                           if not hasattr(np.ndarray, "tostring") else ("mxnet.recordio",))


def test_mxnet_without_distutils_says_to_install_setuptools():
    code = textwrap.dedent("""
        import sys
        sys.modules["distutils"] = sys.modules["setuptools"] = None  # as on Python 3.12 without setuptools
        from plugins.compat import import_mxnet
        import_mxnet()
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "ImportError: mxnet 1.9.1 imports distutils, which Python 3.12 no longer ships: install setuptools in this "
        "environment (pip install setuptools)")


def host_lr_scheduler(tmp_path, patched, pristine):
    """A copy of the host's lr_scheduler.py (from the pristine copy of INSIGHTFACE_DIR's arcface_torch,
    so an installed checkout works too), with patches/lr_scheduler.py.patch applied when ``patched``."""
    shutil.copy(os.path.join(pristine, "lr_scheduler.py"), tmp_path)
    if patched:
        with open(os.path.join(ROOT, "patches", "lr_scheduler.py.patch")) as p:
            subprocess.run(["patch", "-s", "-p1", "-d", str(tmp_path)], stdin=p, check=True)
    return str(tmp_path)


def polynomial_trajectory(folder, warmup, total, steps):
    """LRs of both parameter groups (backbone lr, PartialFC lr / 3) after each step of config.lr_scheduler unset."""
    sys.path.insert(0, folder)
    sys.modules.pop("lr_scheduler", None)
    try:
        params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.1 / 3}], lr=0.1)
        sched = build_lr_scheduler(edict(warmup_step=warmup, total_step=total), opt)
        lrs = [[g["lr"] for g in opt.param_groups]]
        for _ in range(steps):
            opt.step()
            step_lr_scheduler(sched, 1.0)
            lrs.append(sched.get_last_lr())
        return type(sched).__name__, lrs
    finally:
        sys.path.remove(folder)
        sys.modules.pop("lr_scheduler", None)


def upstream_formula(base, warmup, total, steps, power=1.0):
    """arcface_torch's polynomial decay with linear warm-up: lr(0) = base, then base * k / w up to w,
    base * (1 - (k - w) / (T - w)) ** power up to T, 0 after."""
    out = [base]
    for k in range(1, steps + 1):
        if k <= warmup:
            out.append(base * k / warmup)
        else:
            out.append(base * (1.0 - (min(k, total) - warmup) / (total - warmup)) ** power)
    return out


@needs_host
@pytest.mark.parametrize("warmup,total", [(10, 100), (0, 50)])
def test_default_scheduler_follows_the_upstream_formula_on_this_torch(tmp_path, warmup, total, pristine):
    name, lrs = polynomial_trajectory(host_lr_scheduler(tmp_path, True, pristine), warmup, total, total + 20)
    assert name == "PolynomialLRWarmup"
    for group, base in enumerate((0.1, 0.1 / 3)):
        got = [lr[group] for lr in lrs]
        assert got == pytest.approx(upstream_formula(base, warmup, total, total + 20), rel=1e-9, abs=1e-15)
    assert lrs[-1] == [0.0, 0.0]


@needs_host
def test_unpatched_host_scheduler_on_a_torch_without_verbose(tmp_path, pristine):
    folder = host_lr_scheduler(tmp_path, False, pristine)
    if "verbose" in inspect.signature(torch.optim.lr_scheduler.LRScheduler.__init__).parameters:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch 2.2-2.6: verbose is deprecated
            assert polynomial_trajectory(folder, 10, 100, 120)[1][-1] == [0.0, 0.0]
        return
    with pytest.raises(RuntimeError) as err:
        polynomial_trajectory(folder, 10, 100, 120)
    assert str(err.value) == (
        f"{os.path.join(folder, 'lr_scheduler.py')} passes `verbose`, which torch {torch.__version__} no longer "
        f"accepts: install the plugins with ./install.sh INSIGHTFACE_DIR, which patches it")


def test_pack_img_without_tostring_writes_what_mxnet_writes():
    import cv2
    from plugins.compat import _pack_img_with_tobytes
    mx = import_mxnet()
    ours = _pack_img_with_tobytes(mx.recordio)
    img = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    header = mx.recordio.IRHeader(0, 7.0, 3, 0)
    for fmt, quality in ((".jpg", 95), (".png", 3)):
        got = ours(header, img, quality=quality, img_fmt=fmt)
        h, payload = mx.recordio.unpack(got)
        assert (h.label, h.id) == (7.0, 3)
        decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == img.shape and (fmt != ".png" or np.array_equal(decoded, img))
        if hasattr(np.ndarray, "tostring"):  # mxnet's own pack_img still runs here: the same bytes
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                assert got == mx.recordio.pack_img(header, img, quality=quality, img_fmt=fmt)
    assert getattr(mx.recordio.pack_img, "_tobytes", False) == (not hasattr(np.ndarray, "tostring"))
