"""Features of every image record of a RecordIO folder, computed with a proxy model.

Output folder:

* ``features.npy``: N x d float16, L2-normalised, one row per image record in train.idx order
  (memory-map it with ``np.load(path, mmap_mode="r")``);
* ``keys.npy`` and ``labels.npy``: the record key and identity label of each row;
* ``meta.json``: model, dataset, count, dimension, flip, and ``provenance``: what the rows were
  made from (the dataset's train.idx digest and train.rec size; the model's file or weights
  digest, network and embedding size; flip). A folder of another provenance is never resumed
  or reused: ``overwrite=True`` (``--overwrite``) starts again.

Only names of :data:`OWN` are ever written in the folder, and a folder holding anything else is
refused. One run at a time: rank 0 holds ``flock`` on ``.extract.lock`` for the whole run (the
kernel drops it when the process dies, so a killed run leaves no stale lock).

Rows are computed in fixed chunks; a finished chunk is flushed and recorded in
``progress/``, so a killed run continues where it stopped, and because batches never cross
chunk boundaries the finished file equals that of an uninterrupted run. Under torchrun every
rank takes every world_size-th chunk of the same file. ``features.npy`` appears (by rename)
only when every chunk is done.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .files import atomic_output
from .model_check import check_first_batch
from .recordio_index import MAGIC, RecordIOError, image_records, read_index, rec_paths, record_labels

IMAGE_SIZE = 112
OWN = ("features.npy", "features.npy.partial", "keys.npy", "labels.npy", "meta.json", "run.json")
PROGRESS, LOCK = "progress", ".extract.lock"
_TMP = re.compile(r"^(?:%s)\.tmp-\d+(?:\.npy)?$" % "|".join(re.escape(n) for n in OWN))  # atomic_output's names
_MARKER = re.compile(r"^rank\d+-\d+\.txt$")
META_KEYS = ("model", "count", "dimension", "flip")
LABEL_SAMPLE = 4096


def _atomic_json(path, obj):
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _atomic_npy(path, array):
    with atomic_output(path, ".npy") as tmp:
        np.save(tmp, array)


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
        self._f.seek(off)
        head = self._f.read(8)
        magic, lrec = struct.unpack("<II", head) if len(head) == 8 else (None, 0)
        if magic != MAGIC:
            raise RecordIOError(f"{self.rec_path}: no RecordIO record at offset {off}; the .idx does not match")
        if lrec >> 29:
            raise RecordIOError(f"{self.rec_path}: record at offset {off} is split into parts; repack the "
                                f"dataset with im2rec or insightface's RecBuilder")
        return torch.from_numpy(decode_record(self._f.read(lrec & ((1 << 29) - 1)), self.rec_path, off, key))


class _LoaderImages(RecordImages):
    """RecordImages whose errors travel back as values: a DataLoader worker would re-raise them with
    its traceback folded into the message."""

    def __getitem__(self, i):
        try:
            return super().__getitem__(i)
        except (RecordIOError, OSError) as exc:
            return RecordIOError(str(exc))


def _stack(items):
    bad = next((x for x in items if isinstance(x, Exception)), None)
    return bad if bad is not None else torch.stack(items)


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
        self.origin = None  # set by load_checkpoint_model: the file the weights came from
        self._pinned, self._turn = [None, None], 0

    def provenance(self):
        """The checkpoint file's digest, network and embedding size, or the digest of the weights."""
        if self.origin is not None:
            return dict(self.origin)
        h = hashlib.sha256()
        for name, t in sorted(self.module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {"module": self.name, "weights_sha256": h.hexdigest()}

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
        digest = file_sha256(path, "ONNX model")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if str(device).startswith("cuda") \
            else ["CPUExecutionProvider"]
        try:
            self.model = model_zoo.get_model(path, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a model
            raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({_first_line(exc)}); "
                             f"pass an insightface recognition model (.onnx)") from None
        if self.model is None or not hasattr(self.model, "get_feat"):
            raise ValueError(f"{path} is not a recognition model insightface's model_zoo can load; pass an "
                             f"insightface recognition model (.onnx)")
        self.name = os.path.basename(path)
        self.origin = model_origin(onnx=path, digest=digest)

    def provenance(self):
        return dict(self.origin)

    def __call__(self, images, flip):
        bgr = images.numpy()[:, :, :, ::-1]
        feat = self.model.get_feat(list(bgr))
        if flip:
            feat = feat + self.model.get_feat(list(bgr[:, :, ::-1]))
        feat = np.asarray(feat, np.float32)
        return feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def file_sha256(path, what="file"):
    """Hex SHA-256 of a file's content, read in blocks."""
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read ({exc.strerror}); check the path and its "
                         f"permissions") from None


def _examples(names, k=3):
    names = sorted(names)
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def load_checkpoint_model(network, checkpoint, device, embedding_size=512, fp16=True):
    """The host's ``backbones.get_model(network)`` with the weights of an arcface_torch ``model.pt``."""
    try:
        from backbones import get_model
    except ImportError:
        raise ValueError("loading an arcface_torch checkpoint needs the host's backbones package: run from "
                         "recognition/arcface_torch or set INSIGHTFACE_DIR") from None
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    if not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding size must be a positive integer, got {embedding_size!r}")
    digest = file_sha256(checkpoint, "checkpoint")
    try:
        state = torch.load(checkpoint, map_location="cpu")
    except Exception as exc:  # pickle, zip and torch errors alike mean "not a checkpoint"
        raise ValueError(f"{checkpoint} is not a PyTorch checkpoint torch.load can read ({_first_line(exc)}); "
                         f"pass the model.pt arcface_torch saved") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint} holds a {type(state).__name__}, not a state_dict of backbone weights; "
                         f"pass the model.pt arcface_torch saved")
    try:
        module = get_model(network, dropout=0.0, fp16=False, num_features=embedding_size)
    except ValueError:
        module = None
    if module is None:
        raise ValueError(f"--network {network!r} is not a network of the host's backbones.get_model "
                         f"(r18, r34, r50, r100, r200, r2060, mbf, mbf_large, vit_t, vit_s, vit_b, vit_h, ...); "
                         f"pass the network the checkpoint was trained with")
    own = module.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(shape)[:2]]
        parts = [f"{len(missing)} of the network's {len(own)} tensors missing ({_examples(missing)})"
                 if missing else "", f"{len(unexpected)} unexpected ({_examples(unexpected)})" if unexpected else "",
                 f"{len(shape)} of another shape ({', '.join(shapes)}{', ...' if len(shape) > 2 else ''})"
                 if shape else ""]
        raise ValueError(f"{checkpoint} does not hold weights of network {network!r} with embedding size "
                         f"{embedding_size}: {'; '.join(p for p in parts if p)}; pass the --network and "
                         f"--embedding-size it was trained with")
    module.load_state_dict(state)
    model = TorchModel(module, device, fp16)
    model.name = f"{network}:{os.path.abspath(checkpoint)}"
    model.origin = model_origin(checkpoint, network, embedding_size, digest=digest)
    return model


def model_origin(checkpoint=None, network=None, embedding_size=512, onnx=None, digest=None):
    """The provenance recorded for a model file (meta.json: provenance.model): the file's sha256,
    with the network and embedding size of a checkpoint."""
    if onnx:
        return {"onnx_sha256": digest or file_sha256(onnx, "ONNX model")}
    return {"checkpoint_sha256": digest or file_sha256(checkpoint, "checkpoint"), "network": network,
            "embedding_size": int(embedding_size)}


def load_model(checkpoint, network, embedding_size, onnx, device, fp16=True):
    """The ONNX model, or the checkpoint on the host's backbones (found through INSIGHTFACE_DIR when set)."""
    if onnx:
        return OnnxModel(onnx, device)
    insightface = os.environ.get("INSIGHTFACE_DIR")
    if insightface:
        sys.path.insert(0, os.path.join(insightface, "recognition", "arcface_torch"))
    return load_checkpoint_model(network, checkpoint, device, embedding_size, fp16)


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


def dataset_provenance(rec_dir):
    """What identifies a dataset's records: train.idx content (streamed digest) and train.rec size."""
    rec, idx = rec_paths(rec_dir)
    return {"train_idx_sha256": file_sha256(idx, "index"), "train_rec_bytes": os.path.getsize(rec)}


def model_provenance(model):
    if hasattr(model, "provenance"):
        return model.provenance()
    return {"name": getattr(model, "name", type(model).__name__)}


def _differences(old, new, prefix=""):
    """``name (old then, new now)`` for every leaf that differs between two provenance records."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []

    def show(v):
        if v is None or isinstance(v, dict):
            return "not recorded" if v is None else "recorded"
        return v[:12] + "..." if isinstance(v, str) and len(v) > 16 else json.dumps(v)
    return [f"{prefix.rstrip('.') or 'provenance'} ({show(old)} then, {show(new)} now)"]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _foreign(out_dir):
    """Names in ``out_dir`` that extract did not write (empty for a new folder or one of ours)."""
    if not os.path.lexists(out_dir):
        return []
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is not a folder; give a new or empty folder for the features")
    names = set(os.listdir(out_dir))
    foreign = sorted(n for n in names - set(OWN) - {PROGRESS, LOCK} if not _TMP.match(n))
    if PROGRESS in names:
        prog = os.path.join(out_dir, PROGRESS)
        if not os.path.isdir(prog) or os.path.islink(prog):
            foreign.append(PROGRESS)
        else:
            foreign += [f"{PROGRESS}/{m}" for m in sorted(os.listdir(prog)) if not _MARKER.match(m)]
    meta, run = (_read_json(os.path.join(out_dir, n)) if n in names else None for n in ("meta.json", "run.json"))
    if "meta.json" in names and not (isinstance(meta, dict) and all(k in meta for k in META_KEYS)):
        foreign.append("meta.json")
    if "run.json" in names and not (isinstance(run, dict) and "chunk_rows" in run):
        foreign.append("run.json")
    state = sorted(names & (set(OWN) | {PROGRESS}))
    if not foreign and state and meta is None and run is None:
        foreign = state  # our names, but no record that we wrote them
    return foreign


def _check_ours(out_dir):
    foreign = _foreign(out_dir)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ValueError(f"{out_dir} holds files that extract did not write ({shown}); give --out a new or "
                         f"empty folder")


class _Lock:
    """``flock`` on ``.extract.lock`` in the folder, for one run; the kernel releases it if the process dies."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, LOCK)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(f"another extract is writing to {out_dir} (it holds {self.path}); wait for it "
                                 f"to finish or give another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its holder removed meanwhile
                self.fd = fd
                return
            os.close(fd)

    def release(self):
        if self.fd is not None:
            os.remove(self.path)
            os.close(self.fd)
            self.fd = None


def _remove_ours(out_dir, everything):
    """Removes temporaries a killed run left (and with ``everything``, our whole extraction)."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if _TMP.match(name) or everything and name in OWN:
            os.remove(path)
        elif everything and name == PROGRESS:
            shutil.rmtree(path)


def _prepare(rec_dir, out_dir, model, flip, run, overwrite):
    """Rank 0's checks and set-up under the folder's lock; returns (lock, finished, index)."""
    _check_ours(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lock = _Lock(out_dir)
    try:
        _check_ours(out_dir)
        _remove_ours(out_dir, overwrite)
        final, meta_path, run_path = (os.path.join(out_dir, n) for n in ("features.npy", "meta.json", "run.json"))
        again = "give another --out, or add --overwrite to replace it"
        if os.path.exists(final) and os.path.exists(meta_path):
            diff = _differences(_read_json(meta_path).get("provenance"), run["provenance"])
            if diff:
                raise ValueError(f"{out_dir} holds a finished extraction of other inputs: {'; '.join(diff)}; {again}")
            return lock, True, None
        if os.path.exists(run_path):
            previous = _read_json(run_path)
            diff = _differences(previous.get("provenance"), run["provenance"]) or \
                _differences({k: v for k, v in previous.items() if k != "provenance"},
                             {k: v for k, v in run.items() if k != "provenance"})
            if diff:
                raise ValueError(f"{out_dir} holds an unfinished extraction of other inputs or settings: "
                                 f"{'; '.join(diff)}; rerun with those, or add --overwrite to start again")
        else:
            _remove_ours(out_dir, True)  # pieces of a run that never recorded itself
            _atomic_json(run_path, run)
        index = read_index(rec_dir)
        _atomic_npy(os.path.join(out_dir, "keys.npy"), index.keys)
        _atomic_npy(os.path.join(out_dir, "labels.npy"), index.labels.astype(np.int64))
        partial = final + ".partial"
        if not os.path.exists(partial):
            rec, _ = rec_paths(rec_dir)
            probe = model(RecordImages(rec, index.offsets[:1], index.keys[:1])[0][None], flip)
            with atomic_output(partial) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(index), probe.shape[1])).flush()
        return lock, False, index
    except BaseException:
        lock.release()
        raise


def _share(outcome):
    """Rank 0's outcome (an exception or a value) for every rank: no rank waits on a rank 0 that failed."""
    if _dist()[1] > 1:
        box = [outcome if _dist()[0] == 0 else None]
        if isinstance(outcome, Exception) and not isinstance(outcome, (ValueError, OSError)):
            box = [ValueError(_first_line(outcome))]
        torch.distributed.broadcast_object_list(box, src=0)
        outcome = outcome if _dist()[0] == 0 else box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def extract_features(rec_dir, out_dir, model, *, batch_size=256, workers=4, flip=False, chunk_rows=1 << 15,
                     max_chunks=None, progress=True, dataset_name=None, overwrite=False, log=None):
    """Extracts features of every image record of ``rec_dir`` into ``out_dir`` (resumable).

    Args:
        model: a TorchModel, OnnxModel, or callable ``(uint8 images BxHxWx3 RGB, flip) -> B x d``.
        flip: flip test-time augmentation: feature(image) + feature(mirrored image).
        chunk_rows: rows per resumable unit; batches never cross a chunk.
        max_chunks: stop after this many chunks of this rank (a time-limited job); run again to continue.
        overwrite: remove an extraction of other inputs found in ``out_dir`` and start again.
        log: called with one line when the features are written or were already there.

    Returns the output folder when every chunk is done, else None.
    """
    rank, world = _dist()
    rec, _ = rec_paths(rec_dir)
    if batch_size < 1 or chunk_rows < batch_size:
        raise ValueError(f"need 1 <= batch_size <= chunk_rows, got batch_size={batch_size}, chunk_rows={chunk_rows}")
    out_dir = str(out_dir)
    lock = index = run = None
    if rank == 0:
        try:
            run = {"provenance": {"dataset": dataset_provenance(rec_dir), "model": model_provenance(model),
                                  "flip": bool(flip)},
                   "chunk_rows": int(chunk_rows), "batch_size": int(batch_size)}
            lock, finished, index = _prepare(rec_dir, out_dir, model, flip, run, overwrite)
            outcome = finished
        except Exception as exc:
            outcome = exc
        finished = _share(outcome)
    else:
        finished = _share(None)
    try:
        if finished:
            if log and rank == 0:
                log(f"{out_dir} already holds these features (same dataset, model and flip); nothing to do")
            return out_dir
        return _extract(rec_dir, out_dir, model, index, run, batch_size=batch_size,
                        workers=workers, flip=flip, chunk_rows=chunk_rows, max_chunks=max_chunks,
                        progress=progress, dataset_name=dataset_name, log=log)
    finally:
        if lock is not None:
            lock.release()


def _extract(rec_dir, out_dir, model, index, run, *, batch_size, workers, flip, chunk_rows, max_chunks, progress,
             dataset_name, log):
    rank, world = _dist()
    rec, _ = rec_paths(rec_dir)
    final = os.path.join(out_dir, "features.npy")
    index = read_index(rec_dir) if index is None else index
    n = len(index)
    feats = np.load(final + ".partial", mmap_mode="r+")
    progress_dir = os.path.join(out_dir, PROGRESS)
    os.makedirs(progress_dir, exist_ok=True)
    n_chunks = (n + chunk_rows - 1) // chunk_rows
    done = _done_chunks(progress_dir)
    todo = [c for c in range(rank, n_chunks, world) if c not in done]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    rows_todo = sum(min(chunk_rows, n - c * chunk_rows) for c in todo)
    loader = DataLoader(_LoaderImages(rec, index.offsets, index.keys), num_workers=workers, collate_fn=_stack,
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

    def store(out, s, b, handle, images=None):
        f = handle.result()
        if images is not None:  # the first batch of the run: a model whose features carry nothing stops here
            check_first_batch(f, images, getattr(model, "name", type(model).__name__), rec, b)
        if not np.all(np.isfinite(f)):
            raise FloatingPointError(f"the model gave non-finite features for records {b}..{b + len(f) - 1} "
                                     f"of {rec}; check the checkpoint")
        out[b - s:b - s + len(f)] = f
        if bar is not None:
            bar.update(len(f) * world)

    def batch():
        images = next(it)
        if isinstance(images, Exception):
            raise images
        return images

    launch = getattr(model, "launch", None) or (lambda images, flip: _Ready(model(images, flip)))
    it = iter(loader)
    t0 = time.time()
    first = True
    # batch k runs on the device while batch k-1 is stored; chunk k is written while chunk k+1 runs
    try:
        with ThreadPoolExecutor(1) as writer:
            written = None
            for c in todo:
                s, e = c * chunk_rows, min((c + 1) * chunk_rows, n)
                out = np.empty((e - s, feats.shape[1]), np.float16)
                pending = None
                for b in range(s, e, batch_size):
                    images = batch()
                    handle = launch(images, flip)
                    if pending is not None:
                        store(out, s, *pending)
                    pending = (b, handle, images if first else None)
                    first = False
                store(out, s, *pending)
                if written is not None:
                    written.result()
                written = writer.submit(write_chunk, c, s, e, out)
            if written is not None:
                written.result()
    finally:
        marker.close()
        del it, loader
        if bar is not None:
            bar.close()
    elapsed = time.time() - t0
    _barrier()
    if rank != 0:
        return None
    if len(_done_chunks(progress_dir)) < n_chunks:
        return None
    # meta.json first: a kill before the rename leaves an unfinished extraction whose chunks are all done
    _atomic_json(os.path.join(out_dir, "meta.json"), {
        "model": model.name, "dataset": os.path.abspath(rec_dir), "dataset_name": dataset_name or
        os.path.basename(os.path.abspath(rec_dir)), "layout": index.layout, "count": n,
        "dimension": int(feats.shape[1]), "flip": bool(flip), "dtype": "float16",
        "num_classes": index.num_classes, "last_run_seconds": round(elapsed, 3), "provenance": run["provenance"]})
    del feats
    os.replace(final + ".partial", final)
    shutil.rmtree(progress_dir)
    os.remove(os.path.join(out_dir, "run.json"))
    if log:
        log(f"features written to {out_dir}")
    return out_dir


def _load_meta(meta_path):
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{meta_path} is not JSON ({exc}); extract the features again") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path} misses {', '.join(missing)}: it was not written by extract; extract the "
                         f"features again")
    return meta


def _check_dataset(feature_dir, meta, rec_dir, labels, keys):
    """Refuses features whose rows are not this dataset's image records with these labels.

    The train.idx digest recorded at extraction is compared first (it fixes keys and offsets); labels
    are then compared on a sample of rows, or on every row when no digest was recorded.
    """
    recorded = (meta.get("provenance") or {}).get("dataset")
    other = f"features in {feature_dir} were not extracted from {rec_dir}"
    if recorded is not None:
        diff = _differences(recorded, dataset_provenance(rec_dir))
        if diff:
            raise ValueError(f"{other}: {'; '.join(diff)}; extract features of this dataset")
    _, rec_keys, rec_offsets = image_records(rec_dir)
    if not np.array_equal(rec_keys, keys):
        raise ValueError(f"{other}: its {len(keys)} rows do not match the {len(rec_keys)} image records of "
                         f"{rec_dir}; extract features of this dataset")
    rows = np.arange(len(keys))
    if recorded is not None and len(rows) > LABEL_SAMPLE:
        rows = np.unique(np.linspace(0, len(keys) - 1, LABEL_SAMPLE).astype(np.int64))
    rec, _ = rec_paths(rec_dir)
    now = record_labels(rec, rec_keys[rows], rec_offsets[rows])
    wrong = np.flatnonzero(now != labels[rows])
    if len(wrong):
        k = int(rows[wrong[0]])
        raise ValueError(f"{other}: labels differ for {len(wrong)} of {len(rows)} rows compared (record "
                         f"{int(keys[k])}: {int(labels[k])} in labels.npy, {now[wrong[0]]:g} in train.rec); "
                         f"extract features of this dataset")


def load_features(feature_dir, rec_dir=None):
    """(features memmap, labels, keys, meta) of an extraction, checked against ``rec_dir`` when given."""
    path = os.path.join(feature_dir, "features.npy")
    meta_path = os.path.join(feature_dir, "meta.json")
    if not os.path.exists(path) or not os.path.exists(meta_path):
        hint = " (the extraction is unfinished: run extract again to complete it)" \
            if os.path.exists(path + ".partial") else "; give the --out folder of a finished extract run"
        raise FileNotFoundError(f"{feature_dir} holds no finished extraction (features.npy + meta.json){hint}")
    meta = _load_meta(meta_path)
    feats = np.load(path, mmap_mode="r")
    labels = np.load(os.path.join(feature_dir, "labels.npy"))
    keys = np.load(os.path.join(feature_dir, "keys.npy"))
    if not (len(feats) == len(labels) == len(keys) == meta["count"]):
        raise ValueError(f"{feature_dir}: features.npy has {len(feats)} rows, labels.npy {len(labels)}, "
                         f"keys.npy {len(keys)}, meta.json {meta['count']}; the folder is inconsistent, extract again")
    if rec_dir is not None:
        _check_dataset(feature_dir, meta, rec_dir, labels, keys)
    return feats, labels, keys, meta
