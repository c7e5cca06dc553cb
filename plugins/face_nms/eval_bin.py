"""Evaluation .bin files of arcface_torch (LFW, CFP-FP, AgeDB-30, ...): the images of their pairs.

A .bin is a pickle of ``(bins, issame_list)``: ``bins`` the encoded images (JPEG or PNG bytes)
of ``len(issame_list)`` pairs, images 2k and 2k+1 forming pair k. The host decodes each one to
RGB and, when its width is not 112, resizes its shorter side to 112 (``mx.image.resize_short``,
whose default interp=2 reaches OpenCV as INTER_CUBIC); an image that is not square then cannot
be evaluated, so it is refused here by index.

Only the globals such a pickle holds are resolved (:data:`GLOBALS`: the Python 2 or 3 pickles
of bytes, bytearrays, bools and numpy arrays of numpy 1 and 2, protocols 0 to 5), each to an
object already in memory: no module is imported, and a .bin that asks for any other global is
refused before anything of it runs. A file that is not a regular file, or larger than
:data:`MAX_BYTES`, is refused before it is read.
"""
import io
import os
import pickle
import stat
import sys
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 112
MAX_BYTES = 4 << 30  # larger than any evaluation set (LFW: 63 MB, CFP-FP: 97 MB)
_REGENERATE = "regenerate it as insightface does: pickle.dump((bins, issame_list)) of encoded 112x112 faces"
# numpy's pickling helpers: numpy 1 names them numpy.core.<part>, numpy 2 numpy._core.<part>
_NUMPY_HELPERS = {"_reconstruct": "multiarray", "scalar": "multiarray", "_frombuffer": "numeric"}
GLOBALS = frozenset(
    {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")}
    | {(m, n) for m in ("builtins", "__builtin__") for n in ("bytes", "bytearray")}
    | {(f"numpy.{core}.{part}", name) for core in ("core", "_core") for name, part in _NUMPY_HELPERS.items()})


@dataclass
class EvalBin:
    """The encoded images of an evaluation .bin (2 per pair) and its same-identity flags."""
    path: str
    bins: list
    issame: np.ndarray

    def __len__(self):
        return len(self.bins)


class _Refused(pickle.UnpicklingError):
    """A global, or a call of an admitted one, that an evaluation .bin does not hold."""


_LATIN1 = ("latin1", "latin-1", b"latin1", b"latin-1")  # a Python 2 pickle read with encoding="bytes" gives bytes


def _latin1(text, encoding="latin1"):
    # Python 3 pickles bytes for protocols 0-2 as _codecs.encode(text, "latin1"); any other codec
    # would be looked up, and imported, by name
    if not isinstance(text, str) or encoding not in _LATIN1:
        raise _Refused(f"it calls _codecs.encode with {type(text).__name__}, {str(encoding)[:40]!r}, which "
                       f"an evaluation .bin does not hold")
    return text.encode("latin1")


def _binary(kind):
    def make(*args):
        # bytes() / bytearray() of bytes, or of latin-1 text (Python 2); never of a size
        if args == () or len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return kind(*args)
        if len(args) == 2 and isinstance(args[0], str) and args[1] in _LATIN1:
            return kind(args[0], "latin1")
        raise _Refused(f"it calls {kind.__name__} with ({', '.join(type(a).__name__ for a in args)}), which an "
                       f"evaluation .bin does not hold")
    return make


class _NdarrayName:
    """numpy.ndarray as a .bin names it: the subtype argument of _reconstruct, never called itself
    (``ndarray(shape)`` would allocate an array of any size the file asks for)."""
    __name__ = "ndarray"

    def __call__(self, *args, **kwargs):
        raise _Refused(f"it calls numpy.ndarray with ({', '.join(type(a).__name__ for a in args)}), which an "
                       f"evaluation .bin does not hold")


_NDARRAY = _NdarrayName()


def _empty_array(reconstruct):
    def make(subtype, shape, typecode):
        # numpy pickles an array as an empty ndarray that BUILD then fills: never a subclass, never a size
        subtype = np.ndarray if subtype is _NDARRAY else subtype
        if subtype is not np.ndarray or tuple(shape) != (0,):
            raise _Refused(f"it calls _reconstruct with {getattr(subtype, '__name__', type(subtype).__name__)}, "
                           f"shape {str(shape)[:40]}, which an evaluation .bin does not hold")
        return reconstruct(subtype, shape, typecode)
    return make


def _resolve(module, name):
    """The object a .bin's global stands for, taken from modules already imported: never an import."""
    if (module, name) == ("_codecs", "encode"):
        return _latin1
    if name in ("bytes", "bytearray"):
        return _binary(bytes if name == "bytes" else bytearray)
    if (module, name) == ("numpy", "ndarray"):
        return _NDARRAY
    if module == "numpy":
        return getattr(np, name)
    for core in ("_core", "core"):  # the numpy that runs, whichever numpy wrote the file
        helper = getattr(sys.modules.get(f"numpy.{core}.{_NUMPY_HELPERS[name]}"), name, None)
        if helper is not None:
            return _empty_array(helper) if name == "_reconstruct" else helper
    raise _Refused(f"it asks for {module}.{name}, which this numpy does not provide")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in GLOBALS:
            shown = f"{module}.{name}" if len(module) + len(name) < 120 else f"{(module + '.' + name)[:120]}..."
            raise _Refused(f"it asks for {shown}, which an evaluation .bin does not hold")
        return _resolve(module, name)

    def persistent_load(self, pid):
        raise _Refused("it asks for a persistent object, which an evaluation .bin does not hold")


def check_file(path, st=None):
    """Refuses a ``--bin`` that is not a regular file (a device such as /dev/zero, a pipe) or is larger
    than MAX_BYTES, before anything is read."""
    st = os.stat(path) if st is None else st
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"--bin {path} is not a regular file (a device, pipe or socket); give an evaluation "
                         f".bin file")
    if st.st_size > MAX_BYTES:
        raise ValueError(f"--bin {path} holds {st.st_size} bytes, more than {MAX_BYTES} (4 GiB), far more than an "
                         f"evaluation set; give an evaluation .bin file")


def _read(path):
    """The bytes of ``path``: a regular file of at most MAX_BYTES, read with that bound."""
    try:
        # O_NONBLOCK: opening a named pipe waits for no writer; the check refuses it
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            check_file(path, os.fstat(f.fileno()))
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--bin {path} cannot be read ({exc.strerror}); check the path and its permissions") \
            from None
    if len(data) > MAX_BYTES:
        raise ValueError(f"--bin {path} grew past {MAX_BYTES} bytes while read; give an evaluation .bin file")
    return data


def read_bin(path):
    """EvalBin of ``path``, checked: a pickle of (bins, issame_list) with 2 images per pair."""
    data = _read(path)
    try:
        obj = _Unpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as exc:
        raise ValueError(f"--bin {path} is not an evaluation .bin pickle: {exc} (refused, nothing of it was run); "
                         f"{_REGENERATE}") from None
    except Exception as exc:  # a damaged pickle raises anything from EOFError to IndexError
        raise ValueError(f"--bin {path} is not an evaluation .bin pickle ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); {_REGENERATE}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        shown = f"a {len(obj)}-element {type(obj).__name__}" if isinstance(obj, (tuple, list)) \
            else f"a {type(obj).__name__}"
        raise ValueError(f"--bin {path} holds {shown}, not (bins, issame_list); {_REGENERATE}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple, np.ndarray)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise ValueError(f"--bin {path} holds ({type(bins).__name__}, {type(issame).__name__}), not (a list of "
                         f"encoded images, a list of bools); {_REGENERATE}")
    flags = np.asarray(issame).reshape(-1)
    if len(flags) and flags.dtype != bool and not (np.issubdtype(flags.dtype, np.integer) and np.isin(flags, (0, 1)).all()):
        raise ValueError(f"--bin {path}: issame_list holds {flags.dtype} values, not bools; {_REGENERATE}")
    n = len(bins)
    if n % 2:
        raise ValueError(f"--bin {path} holds {n} images, an odd number: its images form pairs (2 per issame "
                         f"entry); {_REGENERATE}")
    if n != 2 * len(flags):
        raise ValueError(f"--bin {path} holds {n} images for {len(flags)} issame entries; a .bin holds 2 images "
                         f"per entry ({2 * len(flags)}): {_REGENERATE}")
    if n == 0:
        raise ValueError(f"--bin {path} holds no image pairs; pass an evaluation .bin with images")
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray, np.ndarray)):
            raise ValueError(f"--bin {path}: image {i} is a {type(b).__name__}, not encoded image bytes; "
                             f"{_REGENERATE}")
    return EvalBin(path, list(bins), flags.astype(bool))


def decode(eval_bin, i):
    """Image ``i`` of an EvalBin as the host loads it: RGB uint8 112x112x3."""
    import cv2
    buf = eval_bin.bins[i]
    raw = np.frombuffer(buf if not isinstance(buf, np.ndarray) else buf.tobytes(), np.uint8)
    try:
        im = cv2.imdecode(raw, cv2.IMREAD_COLOR) if len(raw) else None
    except cv2.error:
        im = None
    if im is None:
        raise ValueError(f"--bin {eval_bin.path}: image {i} ({len(raw)} bytes) is not a decodable image; "
                         f"{_REGENERATE}")
    h, w = im.shape[:2]
    if h != w:
        raise ValueError(f"--bin {eval_bin.path}: image {i} is {w}x{h}, not square; the host's evaluation resizes "
                         f"the shorter side to {IMAGE_SIZE} and needs {IMAGE_SIZE}x{IMAGE_SIZE} faces: {_REGENERATE}")
    if w != IMAGE_SIZE:
        im = cv2.resize(im, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC)
    return im[:, :, ::-1].copy()


def batches(eval_bin, batch_size=256):
    """(first index, uint8 images B x 112 x 112 x 3 RGB) over the images of an EvalBin, in order."""
    for s in range(0, len(eval_bin), batch_size):
        yield s, np.stack([decode(eval_bin, i) for i in range(s, min(s + batch_size, len(eval_bin)))])
