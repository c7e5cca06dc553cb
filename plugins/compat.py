"""mxnet 1.9.1 on the numpy and Python releases that came after it.

mxnet 1.9.1 uses ``numpy.bool`` (removed in numpy 1.24, back in 2.0), names that numpy 2
removed (``PZERO``, ``NINF``, ``msort``, ...), ``ndarray.tostring`` in ``recordio.pack`` and
``recordio.pack_img`` (removed in numpy 2.3) and ``distutils`` (removed from Python 3.12, provided by setuptools).
``import_mxnet()`` supplies the numpy ones and imports mxnet; every
module that uses mxnet, the host's dataset.py included (through the patch), imports it here.
install.sh also installs a copy of this module with an import hook (``mxnet-compat-hook``, see
``mxnet_hook/``) that runs ``before_import`` and ``after_import`` around any ``import mxnet``, so
that the host's own mxnet tools (rec_builder.py, shuffle_rec.py, eval/verification.py) run as they are.
"""
import importlib.util
import numbers
import struct

import numpy as np


# names mxnet 1.9.1 reads from numpy at import time, removed in numpy 1.24 (bool) and 2.x (the rest)
_REMOVED = {
    "bool": bool,
    "PZERO": 0.0, "NZERO": -0.0, "PINF": np.inf, "NINF": -np.inf, "NAN": np.nan, "NaN": np.nan, "Inf": np.inf,
    "alltrue": np.all, "sometrue": np.any, "product": np.prod, "round_": np.round,
    "msort": lambda a: np.sort(a, axis=0),
    "in1d": lambda a, b, **kw: np.isin(a, b, **kw).ravel(),
    "trapz": getattr(np, "trapezoid", None),
}
# removed in numpy 1.20 (NEP 32), where numpy 1.x still answered with a function that raises
_FINANCIAL = ("fv", "ipmt", "irr", "mirr", "nper", "npv", "pmt", "ppmt", "pv", "rate")


def _expired(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"numpy.{name} was removed in numpy 1.20 (NEP 32): use the numpy_financial package")
    return call


def numpy_aliases():
    """The numpy names mxnet 1.9.1 reads at import time, where this numpy no longer has them."""
    for name, value in _REMOVED.items():
        if name not in vars(np) and value is not None:
            setattr(np, name, value)
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        for name in _FINANCIAL:
            if name not in vars(np):
                setattr(np, name, _expired(name))


def _pack_with_tobytes(recordio):
    """``recordio.pack`` for numpy without ``ndarray.tostring``: a list label is written as float32 bytes."""
    def pack(header, s):
        header = recordio.IRHeader(*header)
        if isinstance(header.label, numbers.Number):
            return struct.pack(recordio._IR_FORMAT, 0, header.label, header.id, header.id2) + s
        label = np.asarray(header.label, dtype=np.float32)
        # flag = number of float32 labels stored in front of the payload
        return struct.pack(recordio._IR_FORMAT, label.size, 0, header.id, header.id2) + label.tobytes() + s
    return pack


def _pack_img_with_tobytes(recordio):
    """``recordio.pack_img`` (used by insightface's RecBuilder) for numpy without ``ndarray.tostring``:
    the image encoded by OpenCV, then packed by the ``pack`` above."""
    def pack_img(header, img, quality=95, img_fmt=".jpg"):
        import cv2
        fmt = img_fmt.upper()
        params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt in (".JPG", ".JPEG") else \
            [cv2.IMWRITE_PNG_COMPRESSION, quality] if fmt == ".PNG" else None
        ok, buf = cv2.imencode(img_fmt, img, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode the image as {img_fmt}")
        return recordio.pack(header, buf.tobytes())
    return pack_img


def before_import():
    """What mxnet 1.9.1 needs before its own code runs: the numpy aliases and an importable distutils."""
    numpy_aliases()
    if importlib.util.find_spec("distutils") is None:
        try:
            import setuptools  # noqa: F401  (makes its copy of distutils importable)
        except ImportError:
            pass


def after_import(mxnet):
    """RecordIO writing with ``tobytes`` on a numpy without ``ndarray.tostring``."""
    if not hasattr(np.ndarray, "tostring") and not getattr(mxnet.recordio.pack, "_tobytes", False):
        mxnet.recordio.pack = _pack_with_tobytes(mxnet.recordio)
        mxnet.recordio.pack._tobytes = True
        mxnet.recordio.pack_img = _pack_img_with_tobytes(mxnet.recordio)
        mxnet.recordio.pack_img._tobytes = True


def import_mxnet():
    """The ``mxnet`` module, imported after the aliases it needs."""
    before_import()
    try:
        import mxnet
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "distutils":
            raise
        raise ImportError("mxnet 1.9.1 imports distutils, which Python 3.12 no longer ships: "
                          "install setuptools in this environment (pip install setuptools)") from None
    after_import(mxnet)
    return mxnet
