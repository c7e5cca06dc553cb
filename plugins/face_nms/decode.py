"""Decoding of face records: the bytes of a record to the RGB 112x112 uint8 image every command uses."""
import os
import struct

import numpy as np
import torch
from torch.utils.data import Dataset

from .recordio_index import RecordIOError, read_record

IMAGE_SIZE = 112


def decode_record(buf, rec_path, offset, key=None):
    """RGB uint8 112x112x3 image of one raw record (header stripped)."""
    import cv2
    where = f"record {key} (offset {offset})" if key is not None else f"record at offset {offset}"
    flag = struct.unpack("<I", buf[:4])[0] if len(buf) >= 4 else 0
    start = 24 + 4 * flag
    if len(buf) <= start:
        raise RecordIOError(f"{rec_path}: {where} holds no image bytes ({len(buf)}-byte payload); "
                            f"repack the dataset or drop the record from train.idx")
    im = cv2.imdecode(np.frombuffer(buf, np.uint8, offset=start), cv2.IMREAD_COLOR)
    if im is None:
        raise RecordIOError(f"{rec_path}: {where} does not hold a decodable image; repack the dataset or "
                            f"drop the record from train.idx")
    if im.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        im = cv2.resize(im, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return im[:, :, ::-1].copy()


class RecordImages(Dataset):
    """Decoded images of records given by byte offset; the file is opened once per worker."""

    def __init__(self, rec_path, offsets, keys=None):
        self.rec_path, self.offsets, self.keys, self._f = rec_path, offsets, keys, None

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        if self._f is None:
            self._f = open(self.rec_path, "rb")
        off = int(self.offsets[i])
        key = int(self.keys[i]) if self.keys is not None else None
        return torch.from_numpy(decode_record(read_record(self._f, off, self.rec_path, key), self.rec_path, off, key))


def decode_image_file(path):
    """RGB uint8 112x112x3 image of one file, opened as the host's ImageFolder opens it (torchvision's
    default_loader: PIL, converted to RGB). The host's ImageFolder transform does not resize, so an image
    of another size would not train as it is: it is refused, naming the file."""
    from PIL import Image
    from .folder_dataset import FolderError
    try:
        with open(path, "rb") as f:
            im = Image.open(f)
            im = im.convert("RGB")
    except OSError as exc:
        from PIL import UnidentifiedImageError
        if isinstance(exc, UnidentifiedImageError):
            why = "PIL cannot identify it as an image"
        else:
            why = exc.strerror or str(exc) or type(exc).__name__
        raise FolderError(f"image {path} cannot be decoded ({why}); fix or remove it") from None
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise FolderError(f"image {path} is {im.size[0]}x{im.size[1]}, not {IMAGE_SIZE}x{IMAGE_SIZE}: the host's "
                          f"ImageFolder pipeline does not resize, so it would not train; resize the folder's images "
                          f"to {IMAGE_SIZE}x{IMAGE_SIZE} (aligned faces)")
    return np.asarray(im, np.uint8).copy()


class FolderImages(Dataset):
    """Decoded images of files given relative to ``root``."""

    def __init__(self, root, files):
        self.root, self.files = root, files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(decode_image_file(os.path.join(self.root, self.files[i])))
