"""mxnet 1.9.1 on the numpy and Python releases that came after it.

mxnet 1.9.1 uses ``numpy.bool`` (removed in numpy 1.24, back in 2.0), ``ndarray.tostring``
in ``recordio.pack`` (removed in numpy 2.3) and ``distutils`` (removed from Python 3.12,
provided by setuptools). ``import_mxnet()`` supplies the first two and imports mxnet; every
module that uses mxnet, the host's dataset.py included (through the patch), imports it here.
"""
import numbers
import struct

import numpy as np


def numpy_aliases():
    """The numpy names mxnet 1.9.1 reads at import time."""
    if "bool" not in np.__dict__:
        np.bool = bool


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


def import_mxnet():
    """The ``mxnet`` module, imported after the aliases it needs."""
    numpy_aliases()
    try:
        import mxnet
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "distutils":
            raise
        raise ImportError("mxnet 1.9.1 imports distutils, which Python 3.12 no longer ships: "
                          "install setuptools in this environment (pip install setuptools)") from None
    if not hasattr(np.ndarray, "tostring") and not getattr(mxnet.recordio.pack, "_tobytes", False):
        mxnet.recordio.pack = _pack_with_tobytes(mxnet.recordio)
        mxnet.recordio.pack._tobytes = True
    return mxnet
