"""Features of every image record of a RecordIO folder, computed with a proxy model.

Output folder:

* ``features.npy``: N x d float16, L2-normalised, one row per image record in train.idx order
  (memory-map it with ``np.load(path, mmap_mode="r")``);
* ``keys.npy`` and ``labels.npy``: the record key and identity label of each row;
* ``meta.json``: model, dataset, count, dimension, flip.

Rows are computed in fixed chunks; a finished chunk is flushed and recorded in
``progress/``, so a killed run continues where it stopped, and because batches never cross
chunk boundaries the finished file equals that of an uninterrupted run. Under torchrun every
rank takes every world_size-th chunk of the same file. ``features.npy`` appears (by rename)
only when every chunk is done.
"""
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .files import atomic_output
from .recordio_index import MAGIC, RecordIOError, image_records, read_index, rec_paths

IMAGE_SIZE = 112


def _atomic_json(path, obj):
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _atomic_npy(path, array):
    with atomic_output(path, ".npy") as tmp:
        np.save(tmp, array)


def decode_record(buf, rec_path, offset):
    """RGB uint8 112x112x3 image of one raw record (header stripped)."""
    import cv2
    flag = struct.unpack("<I", buf[:4])[0]
    img = np.frombuffer(buf, np.uint8, offset=24 + 4 * flag)
    im = cv2.imdecode(img, cv2.IMREAD_COLOR)
    if im is None:
        raise RecordIOError(f"{rec_path}: record at offset {offset} does not hold a decodable image")
    if im.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        im = cv2.resize(im, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return im[:, :, ::-1].copy()


class RecordImages(Dataset):
    """Decoded images of records given by byte offset; the file is opened once per worker."""

    def __init__(self, rec_path, offsets):
        self.rec_path, self.offsets, self._f = rec_path, offsets, None

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        if self._f is None:
            self._f = open(self.rec_path, "rb")
        off = int(self.offsets[i])
        self._f.seek(off)
        magic, lrec = struct.unpack("<II", self._f.read(8))
        if magic != MAGIC:
            raise RecordIOError(f"{self.rec_path}: no RecordIO record at offset {off}; the .idx does not match")
        if lrec >> 29:
            raise RecordIOError(f"{self.rec_path}: record at offset {off} is split into parts; repack the "
                                f"dataset with im2rec or insightface's RecBuilder")
        return torch.from_numpy(decode_record(self._f.read(lrec & ((1 << 29) - 1)), self.rec_path, off))


class _Ready:
    """Result of a synchronous model call, with the interface of :class:`_InFlight`."""

    def __init__(self, features):
        self.features = features

    def result(self):
        return self.features


class _InFlight:
    """Features being copied to pinned host memory; ``result`` waits for that copy only."""

    def __init__(self, host, event):
        self.host, self.event = host, event

    def result(self):
        self.event.synchronize()
        return self.host.numpy()


class TorchModel:
    """An arcface_torch backbone (or any module mapping Bx3x112x112 in [-1, 1] to features).

    On a GPU it runs in fp16 autocast with channels-last weights, and ``launch`` returns before
    the batch is computed, so the caller can fetch the next batch meanwhile.
    """

    def __init__(self, module, device, fp16=True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.module = module.to(self.device).eval()
        if self.cuda:
            self.module = self.module.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.amp = fp16 and self.cuda
        self.name = type(module).__name__
        self._pinned, self._turn = [None, None], 0

    @torch.no_grad()
    def launch(self, images, flip):
        # NHWC uint8 permuted to NCHW is already channels-last in memory: no copy
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.div_(255).sub_(0.5).div_(0.5)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            feat = self.module(x).float()
            if flip:
                feat = feat + self.module(torch.flip(x, dims=[3])).float()
        feat = torch.nn.functional.normalize(feat, dim=1).half()
        if not self.cuda:
            return _Ready(feat.numpy())
        # two pinned buffers: batch k is copied into one while the caller reads batch k-1 from the other
        self._turn ^= 1
        host = self._pinned[self._turn]
        if host is None or host.shape != feat.shape:
            host = self._pinned[self._turn] = torch.empty(feat.shape, dtype=feat.dtype, pin_memory=True)
        host.copy_(feat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _InFlight(host, event)

    def __call__(self, images, flip):
        return np.array(self.launch(images, flip).result(), np.float32)


class OnnxModel:
    """An ONNX recognition model run by insightface's model_zoo (onnxruntime)."""

    def __init__(self, path, device):
        from insightface.model_zoo import model_zoo
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model {path} not found")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if str(device).startswith("cuda") \
            else ["CPUExecutionProvider"]
        self.model = model_zoo.get_model(path, providers=providers)
        if self.model is None or not hasattr(self.model, "get_feat"):
            raise ValueError(f"{path} is not a recognition model insightface's model_zoo can load")
        self.name = os.path.basename(path)

    def __call__(self, images, flip):
        bgr = images.numpy()[:, :, :, ::-1]
        feat = self.model.get_feat(list(bgr))
        if flip:
            feat = feat + self.model.get_feat(list(bgr[:, :, ::-1]))
        feat = np.asarray(feat, np.float32)
        return feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)


def load_checkpoint_model(network, checkpoint, device, embedding_size=512, fp16=True):
    """The host's ``backbones.get_model(network)`` with the weights of an arcface_torch ``model.pt``."""
    try:
        from backbones import get_model
    except ImportError as exc:
        raise ImportError("loading an arcface_torch checkpoint needs the host's backbones package: run from "
                          "recognition/arcface_torch or set INSIGHTFACE_DIR") from exc
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    module = get_model(network, dropout=0.0, fp16=False, num_features=embedding_size)
    state = torch.load(checkpoint, map_location="cpu")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint} does not hold weights of network {network!r}: {exc}") from None
    model = TorchModel(module, device, fp16)
    model.name = f"{network}:{os.path.abspath(checkpoint)}"
    return model


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier():
    if _dist()[1] > 1:
        torch.distributed.barrier()


def _done_chunks(progress_dir):
    done = set()
    if os.path.isdir(progress_dir):
        for name in os.listdir(progress_dir):
            with open(os.path.join(progress_dir, name)) as f:
                done.update(int(line) for line in f if line.strip())
    return done


def _chunk_batches(chunks, chunk_rows, n, batch_size):
    for c in chunks:
        s, e = c * chunk_rows, min((c + 1) * chunk_rows, n)
        for b in range(s, e, batch_size):
            yield list(range(b, min(b + batch_size, e)))


def extract_features(rec_dir, out_dir, model, *, batch_size=256, workers=4, flip=False, chunk_rows=1 << 15,
                     max_chunks=None, progress=True, dataset_name=None):
    """Extracts features of every image record of ``rec_dir`` into ``out_dir`` (resumable).

    Args:
        model: a TorchModel, OnnxModel, or callable ``(uint8 images BxHxWx3 RGB, flip) -> B x d``.
        flip: flip test-time augmentation: feature(image) + feature(mirrored image).
        chunk_rows: rows per resumable unit; batches never cross a chunk.
        max_chunks: stop after this many chunks of this rank (a time-limited job); run again to continue.

    Returns the output folder when every chunk is done, else None.
    """
    rank, world = _dist()
    rec, _ = rec_paths(rec_dir)
    if batch_size < 1 or chunk_rows < batch_size:
        raise ValueError(f"need 1 <= batch_size <= chunk_rows, got batch_size={batch_size}, chunk_rows={chunk_rows}")
    final = os.path.join(out_dir, "features.npy")
    if os.path.exists(os.path.join(out_dir, "meta.json")) and os.path.exists(final):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    run = {"rec_dir": os.path.abspath(rec_dir), "rec_size": os.path.getsize(rec), "model": model.name,
           "flip": bool(flip), "chunk_rows": int(chunk_rows), "batch_size": int(batch_size)}
    run_path = os.path.join(out_dir, "run.json")
    if rank == 0:
        if os.path.exists(run_path):
            with open(run_path) as f:
                previous = json.load(f)
            if previous != run:
                raise ValueError(f"{out_dir} holds an unfinished extraction with other settings ({previous}); "
                                 f"use another --out or delete it")
        index = read_index(rec_dir)
        _atomic_npy(os.path.join(out_dir, "keys.npy"), index.keys)
        _atomic_npy(os.path.join(out_dir, "labels.npy"), index.labels.astype(np.int64))
        probe = model(RecordImages(rec, index.offsets[:1])[0][None], flip)
        partial = final + ".partial"
        if not os.path.exists(partial):
            with atomic_output(partial) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(index), probe.shape[1])).flush()
        _atomic_json(run_path, run)
    _barrier()
    index = read_index(rec_dir) if rank != 0 else index
    n = len(index)
    feats = np.load(final + ".partial", mmap_mode="r+")
    progress_dir = os.path.join(out_dir, "progress")
    os.makedirs(progress_dir, exist_ok=True)
    n_chunks = (n + chunk_rows - 1) // chunk_rows
    done = _done_chunks(progress_dir)
    todo = [c for c in range(rank, n_chunks, world) if c not in done]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    rows_todo = sum(min(chunk_rows, n - c * chunk_rows) for c in todo)
    loader = DataLoader(RecordImages(rec, index.offsets), num_workers=workers,
                        batch_sampler=list(_chunk_batches(todo, chunk_rows, n, batch_size)),
                        pin_memory=getattr(model, "device", torch.device("cpu")).type == "cuda",
                        persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=rows_todo * world, desc="extract", unit="face", unit_scale=True, smoothing=0.05,
                   initial=0)
    marker = open(os.path.join(progress_dir, f"rank{rank}-{os.getpid()}.txt"), "a")

    def write_chunk(c, s, e, out):
        feats[s:e] = out
        feats.flush()
        marker.write(f"{c}\n")
        marker.flush()
        os.fsync(marker.fileno())

    def store(out, s, b, handle):
        f = handle.result()
        if not np.all(np.isfinite(f)):
            raise FloatingPointError(f"the model gave non-finite features for records {b}..{b + len(f) - 1} "
                                     f"of {rec}; check the checkpoint")
        out[b - s:b - s + len(f)] = f
        if bar is not None:
            bar.update(len(f) * world)

    launch = getattr(model, "launch", None) or (lambda images, flip: _Ready(model(images, flip)))
    it = iter(loader)
    t0 = time.time()
    # batch k runs on the device while batch k-1 is stored; chunk k is written while chunk k+1 runs
    try:
        with ThreadPoolExecutor(1) as writer:
            written = None
            for c in todo:
                s, e = c * chunk_rows, min((c + 1) * chunk_rows, n)
                out = np.empty((e - s, feats.shape[1]), np.float16)
                pending = None
                for b in range(s, e, batch_size):
                    handle = launch(next(it), flip)
                    if pending is not None:
                        store(out, s, *pending)
                    pending = (b, handle)
                store(out, s, *pending)
                if written is not None:
                    written.result()
                written = writer.submit(write_chunk, c, s, e, out)
            if written is not None:
                written.result()
    finally:
        marker.close()
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    _barrier()
    if rank != 0:
        return None
    if len(_done_chunks(progress_dir)) < n_chunks:
        return None
    os.replace(final + ".partial", final)
    for name in os.listdir(progress_dir):
        os.remove(os.path.join(progress_dir, name))
    os.rmdir(progress_dir)
    _atomic_json(os.path.join(out_dir, "meta.json"), {
        "model": model.name, "dataset": os.path.abspath(rec_dir), "dataset_name": dataset_name or
        os.path.basename(os.path.abspath(rec_dir)), "layout": index.layout, "count": n,
        "dimension": int(np.load(final, mmap_mode="r").shape[1]), "flip": bool(flip), "dtype": "float16",
        "num_classes": index.num_classes, "last_run_seconds": round(elapsed, 3)})
    os.remove(run_path)
    return out_dir


def load_features(feature_dir, rec_dir=None):
    """(features memmap, labels, keys, meta) of an extraction, checked against ``rec_dir`` when given."""
    path = os.path.join(feature_dir, "features.npy")
    meta_path = os.path.join(feature_dir, "meta.json")
    if not os.path.exists(path) or not os.path.exists(meta_path):
        hint = " (the extraction is unfinished: run extract again to complete it)" \
            if os.path.exists(path + ".partial") else ""
        raise FileNotFoundError(f"{feature_dir} holds no finished extraction (features.npy + meta.json){hint}")
    with open(meta_path) as f:
        meta = json.load(f)
    feats = np.load(path, mmap_mode="r")
    labels = np.load(os.path.join(feature_dir, "labels.npy"))
    keys = np.load(os.path.join(feature_dir, "keys.npy"))
    if not (len(feats) == len(labels) == len(keys) == meta["count"]):
        raise ValueError(f"{feature_dir}: features.npy has {len(feats)} rows, labels.npy {len(labels)}, "
                         f"keys.npy {len(keys)}, meta.json {meta['count']}; the folder is inconsistent, extract again")
    if rec_dir is not None:
        _, rec_keys, _ = image_records(rec_dir)
        if not np.array_equal(rec_keys, keys):
            raise ValueError(f"features in {feature_dir} ({len(feats)} rows) do not match the {len(rec_keys)} image "
                             f"records of {rec_dir}; extract features of this dataset")
    return feats, labels, keys, meta
