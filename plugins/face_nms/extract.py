"""Features of every face record of a dataset (a RecordIO folder or an image folder), computed with a proxy model.

Output folder:

* ``features.npy``: N x d float16, L2-normalised, one row per face record in the dataset's order (train.idx
  order; for an image folder, torchvision's ImageFolder order, the key being the row)
  (memory-map it with ``np.load(path, mmap_mode="r")``);
* ``keys.npy`` and ``labels.npy``: the record key and identity label of each row;
* ``meta.json``: model, dataset, count, dimension, flip, and ``provenance``: what the rows were
  made from (the dataset's train.idx digest, train.rec size, sampled-records digest and mtime,
  :mod:`.provenance`; the model's file or weights digest, network and embedding size; flip). A folder of another provenance is never resumed
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
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import open_dataset
from .files import atomic_output
from .features import META_KEYS
from .locks import FolderLock
from .model_check import check_first_batch
from .models import Ready, first_line
from .provenance import differences, model_provenance, provenance_differences
from .recordio_index import RecordIOError

OWN = ("features.npy", "features.npy.partial", "keys.npy", "labels.npy", "meta.json", "run.json")
PROGRESS, LOCK = "progress", ".extract.lock"
_TMP = re.compile(r"^(?:%s)\.tmp-\d+(?:\.npy)?$" % "|".join(re.escape(n) for n in OWN))  # atomic_output's names
_MARKER = re.compile(r"^rank\d+-\d+\.txt$")
_BUSY = "another extract is writing to {folder} (it holds {lock}); wait for it to finish or give another --out"


def _atomic_json(path, obj):
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _atomic_npy(path, array):
    with atomic_output(path, ".npy") as tmp:
        np.save(tmp, array)


class _LoaderImages:
    """A dataset's images whose errors travel back as values: a DataLoader worker would re-raise them with
    its traceback folded into the message."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            return self.images[i]
        except (ValueError, OSError) as exc:
            return RecordIOError(str(exc))


def _stack(items):
    bad = next((x for x in items if isinstance(x, Exception)), None)
    return bad if bad is not None else torch.stack(items)


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


def _remove_ours(out_dir, everything):
    """Removes temporaries a killed run left (and with ``everything``, our whole extraction)."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if _TMP.match(name) or everything and name in OWN:
            os.remove(path)
        elif everything and name == PROGRESS:
            shutil.rmtree(path)


def _prepare(ds, out_dir, model, flip, run, overwrite, log=None):
    """Rank 0's checks and set-up under the folder's lock; returns (lock, finished, index)."""
    _check_ours(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lock = FolderLock(out_dir, LOCK, _BUSY)
    try:
        _check_ours(out_dir)
        _remove_ours(out_dir, overwrite)
        final, meta_path, run_path = (os.path.join(out_dir, n) for n in ("features.npy", "meta.json", "run.json"))
        again = "give another --out, or add --overwrite to replace it"
        if os.path.exists(final) and os.path.exists(meta_path):
            diff = provenance_differences(_read_json(meta_path).get("provenance"), run["provenance"], ds.path, log)
            if diff:
                raise ValueError(f"{out_dir} holds a finished extraction of other inputs: {'; '.join(diff)}; {again}")
            return lock, True, None
        if os.path.exists(run_path):
            previous = _read_json(run_path)
            diff = provenance_differences(previous.get("provenance"), run["provenance"], ds.path, log) or \
                differences({k: v for k, v in previous.items() if k != "provenance"},
                             {k: v for k, v in run.items() if k != "provenance"})
            if diff:
                raise ValueError(f"{out_dir} holds an unfinished extraction of other inputs or settings: "
                                 f"{'; '.join(diff)}; rerun with those, or add --overwrite to start again")
        else:
            _remove_ours(out_dir, True)  # pieces of a run that never recorded itself
            _atomic_json(run_path, run)
        _atomic_npy(os.path.join(out_dir, "keys.npy"), ds.keys)
        _atomic_npy(os.path.join(out_dir, "labels.npy"), ds.labels.astype(np.int64))
        partial = final + ".partial"
        if not os.path.exists(partial):
            probe = model(ds.images([0])[0][None], flip)
            with atomic_output(partial) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(ds), probe.shape[1])).flush()
        return lock, False, ds
    except BaseException:
        lock.release()
        raise


def _share(outcome):
    """Rank 0's outcome (an exception or a value) for every rank: no rank waits on a rank 0 that failed."""
    if _dist()[1] > 1:
        box = [outcome if _dist()[0] == 0 else None]
        if isinstance(outcome, Exception) and not isinstance(outcome, (ValueError, OSError)):
            box = [ValueError(first_line(outcome))]
        torch.distributed.broadcast_object_list(box, src=0)
        outcome = outcome if _dist()[0] == 0 else box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def extract_features(rec_dir, out_dir, model, *, batch_size=256, workers=4, flip=False, chunk_rows=1 << 15,
                     max_chunks=None, progress=True, dataset_name=None, overwrite=False, log=None):
    """Extracts features of every face record of ``rec_dir`` into ``out_dir`` (resumable).

    Args:
        rec_dir: a RecordIO folder or an image folder (or a :mod:`.datasets` object).
        model: a TorchModel, OnnxModel, or callable ``(uint8 images BxHxWx3 RGB, flip) -> B x d``.
        flip: flip test-time augmentation: feature(image) + feature(mirrored image).
        chunk_rows: rows per resumable unit; batches never cross a chunk.
        max_chunks: stop after this many chunks of this rank (a time-limited job); run again to continue.
        overwrite: remove an extraction of other inputs found in ``out_dir`` and start again.
        log: called with one line when the features are written or were already there.

    Returns the output folder when every chunk is done, else None.
    """
    rank, world = _dist()
    ds = open_dataset(rec_dir, progress=progress and rank == 0)
    rec_dir = ds.path
    if batch_size < 1 or chunk_rows < batch_size:
        raise ValueError(f"need 1 <= batch_size <= chunk_rows, got batch_size={batch_size}, chunk_rows={chunk_rows}")
    out_dir = str(out_dir)
    lock = index = run = None
    if rank == 0:
        try:
            run = {"provenance": {"dataset": ds.provenance(), "model": model_provenance(model),
                                  "flip": bool(flip)},
                   "chunk_rows": int(chunk_rows), "batch_size": int(batch_size)}
            lock, finished, index = _prepare(ds, out_dir, model, flip, run, overwrite, log)
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
        return _extract(ds, out_dir, model, run, batch_size=batch_size,
                        workers=workers, flip=flip, chunk_rows=chunk_rows, max_chunks=max_chunks,
                        progress=progress, dataset_name=dataset_name, log=log)
    finally:
        if lock is not None:
            lock.release()


def _extract(ds, out_dir, model, run, *, batch_size, workers, flip, chunk_rows, max_chunks, progress,
             dataset_name, log):
    rank, world = _dist()
    rec_dir = ds.path
    final = os.path.join(out_dir, "features.npy")
    n = len(ds)
    feats = np.load(final + ".partial", mmap_mode="r+")
    progress_dir = os.path.join(out_dir, PROGRESS)
    os.makedirs(progress_dir, exist_ok=True)
    n_chunks = (n + chunk_rows - 1) // chunk_rows
    done = _done_chunks(progress_dir)
    todo = [c for c in range(rank, n_chunks, world) if c not in done]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    rows_todo = sum(min(chunk_rows, n - c * chunk_rows) for c in todo)
    loader = DataLoader(_LoaderImages(ds.images()), num_workers=workers, collate_fn=_stack,
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
            check_first_batch(f, images, getattr(model, "name", type(model).__name__), rec_dir, b)
        if not np.all(np.isfinite(f)):
            raise FloatingPointError(f"the model gave non-finite features for records {b}..{b + len(f) - 1} "
                                     f"of {rec_dir}; check the checkpoint")
        out[b - s:b - s + len(f)] = f
        if bar is not None:
            bar.update(len(f) * world)

    def batch():
        images = next(it)
        if isinstance(images, Exception):
            raise images
        return images

    launch = getattr(model, "launch", None) or (lambda images, flip: Ready(model(images, flip)))
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
        os.path.basename(os.path.abspath(rec_dir)), "layout": ds.layout, "count": n,
        "dimension": int(feats.shape[1]), "flip": bool(flip), "dtype": "float16",
        "num_classes": ds.num_classes, "last_run_seconds": round(elapsed, 3), "provenance": run["provenance"]})
    del feats
    os.replace(final + ".partial", final)
    shutil.rmtree(progress_dir)
    os.remove(os.path.join(out_dir, "run.json"))
    if log:
        log(f"features written to {out_dir}")
    return out_dir


