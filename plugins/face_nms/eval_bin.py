"""Evaluation .bin files of arcface_torch (LFW, CFP-FP, AgeDB-30, ...): the images of their pairs.

A .bin is a pickle of ``(bins, issame_list)``: ``bins`` the encoded images (JPEG or PNG bytes)
of ``len(issame_list)`` pairs, images 2k and 2k+1 forming pair k. The host decodes each one to
RGB and, when its width is not 112, resizes its shorter side to 112 (``mx.image.resize_short``,
whose default interp=2 reaches OpenCV as INTER_CUBIC); an image that is not square then cannot
be evaluated, so it is refused here by index.

Only the types such a pickle holds are unpickled (bytes, lists, tuples, bools and numpy arrays):
a .bin that asks for any other class is refused rather than run.
"""
import io
import pickle
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 112
_REGENERATE = "regenerate it as insightface does: pickle.dump((bins, issame_list)) of encoded 112x112 faces"
_NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


@dataclass
class EvalBin:
    """The encoded images of an evaluation .bin (2 per pair) and its same-identity flags."""
    path: str
    bins: list
    issame: np.ndarray

    def __len__(self):
        return len(self.bins)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "_codecs" and name == "encode" or \
                module.split(".")[0] == "numpy" and name in _NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which an evaluation .bin does not hold")


def read_bin(path):
    """EvalBin of ``path``, checked: a pickle of (bins, issame_list) with 2 images per pair."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"--bin {path} cannot be read ({exc.strerror}); check the path and its permissions") \
            from None
    try:
        obj = _Unpickler(io.BytesIO(data), encoding="bytes").load()
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
