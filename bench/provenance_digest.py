"""Cost of a dataset's provenance (provenance.dataset_provenance) at WebFace42M's record count.

Parts timed, cold (the files' pages dropped with posix_fadvise DONTNEED) and warm:

* train.idx sha256, streamed: the big part; reported as a ratio to one sequential read of the same
  bytes, timed in the same run (the physical bound);
* the sampled record digest (RECORD_SAMPLE records spread over train.idx, each an index line and
  a record payload);
* stat of train.rec (size, mtime);
* the whole ``dataset_provenance``;
* (warm) the header peek of ``record_labels`` over the first 1M records, the vectorised path every
  single-part record takes, as records/s.

The dataset (--records, default 42M, tiny ~100-byte payloads: about 4.5 GB train.rec and 0.8 GB
train.idx) is generated with numpy in the byte layout dmlc's RecordIO writer produces (no payload
holds the magic word at an aligned offset, so no record needs parts), checked with mxnet's own
reader on a prefix, and deleted afterwards unless --keep (--work-dir reuses one).
"""
import argparse
import hashlib
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time

import numpy as np

from common import save, table
from plugins.face_nms.provenance import RECORD_SAMPLE, dataset_provenance, file_sha256, record_sample_digest
from plugins.face_nms.recordio_index import MAGIC, record_labels

PAYLOAD = 100  # IRHeader (24 bytes) + 76 image bytes
CHUNK = 1 << 20


def generate(rec_dir, n, seed=0):
    """train.rec + train.idx of ``n`` records (im2rec layout, keys 0..n-1, label key // 20)."""
    os.makedirs(rec_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    record = 8 + PAYLOAD  # PAYLOAD is a multiple of 4: no padding
    with open(os.path.join(rec_dir, "train.rec"), "wb") as fr, open(os.path.join(rec_dir, "train.idx"), "w") as fi:
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            keys = np.arange(s, s + m, dtype=np.int64)
            buf = np.empty((m, record), np.uint8)
            body = rng.integers(0, 256, (m, PAYLOAD - 24), dtype=np.uint8)
            words = body.view("<u4")
            words[words == MAGIC] ^= 1  # dmlc's writer would split such a record; keep every record whole
            buf[:, 32:] = body
            head = buf[:, :32].view(np.uint8)
            head[:, 0:4] = np.frombuffer(struct.pack("<I", MAGIC), np.uint8)
            head[:, 4:8] = np.frombuffer(struct.pack("<I", PAYLOAD), np.uint8)
            head[:, 8:12] = 0  # flag
            head[:, 12:16] = (keys // 20).astype("<f4").view(np.uint8).reshape(m, 4)
            head[:, 16:24] = keys.astype("<u8").view(np.uint8).reshape(m, 8)
            head[:, 24:32] = 0
            fr.write(buf.tobytes())
            offsets = keys * record
            fi.write("".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist())))
        fr.flush()
        fi.flush()
        os.fsync(fr.fileno())
        os.fsync(fi.fileno())


def check_with_mxnet(rec_dir, prefix=2000):
    """The first ``prefix`` records read by mxnet's MXIndexedRecordIO: labels, ids and payload sizes."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from plugins.compat import import_mxnet
    mx = import_mxnet()
    part = os.path.join(rec_dir, "prefix.idx")
    with open(os.path.join(rec_dir, "train.idx")) as f, open(part, "w") as g:
        for _ in range(prefix):
            g.write(f.readline())
    r = mx.recordio.MXIndexedRecordIO(part, os.path.join(rec_dir, "train.rec"), "r")
    for k in range(prefix):
        header, body = mx.recordio.unpack(r.read_idx(k))
        assert header.label == k // 20 and header.id == k and len(body) == PAYLOAD - 24, (k, header)
    r.close()
    os.remove(part)
    return prefix


def drop(*paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(path, block=1 << 20):
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while True:
            got = f.readinto(buf)
            if not got:
                return n
            n += got


def timed(fn, cold_paths, cold, repeats):
    out = []
    for _ in range(repeats):
        if cold:
            drop(*cold_paths)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=42_000_000)
    p.add_argument("--work-dir", help="folder of the generated dataset (reused when it holds one of --records)")
    p.add_argument("--keep", action="store_true", help="keep the dataset afterwards")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="provenance_digest_42M")
    args = p.parse_args()
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="provenance-bench-"))
    rec, idx = os.path.join(work, "train.rec"), os.path.join(work, "train.idx")
    want = args.records * (8 + PAYLOAD)
    made = os.path.isfile(rec) and os.path.getsize(rec) == want and os.path.isfile(idx)
    free = shutil.disk_usage(os.path.dirname(work) if not os.path.exists(work) else work).free
    if not made and free < 1.5 * want:
        sys.exit(f"{work}: {free / 1e9:.1f} GB free, the dataset needs {want * 1.2 / 1e9:.1f} GB")
    t0 = time.perf_counter()
    if not made:
        generate(work, args.records)
    gen_s = time.perf_counter() - t0
    checked = check_with_mxnet(work)
    try:
        idx_bytes = os.path.getsize(idx)
        rows, result = [], {"records": args.records, "train_rec_bytes": os.path.getsize(rec),
                            "train_idx_bytes": idx_bytes, "record_sample": RECORD_SAMPLE,
                            "generate_seconds": round(gen_s, 1), "checked_with_mxnet": checked, "parts": {}}
        for cold in (True, False):
            state = "cold" if cold else "warm"
            if not cold:
                sequential_read(idx), file_sha256(idx), record_sample_digest(rec, idx)  # warm the pages
            read_s, read_all = timed(lambda: sequential_read(idx), [idx], cold, args.repeats)
            sha_s, sha_all = timed(lambda: file_sha256(idx), [idx], cold, args.repeats)
            sample_s, sample_all = timed(lambda: record_sample_digest(rec, idx), [idx, rec], cold, args.repeats)
            stat_s, _ = timed(lambda: os.stat(rec), [rec], cold, args.repeats)
            total_s, total_all = timed(lambda: dataset_provenance(work), [idx, rec], cold, args.repeats)
            zeros = bytes(idx_bytes)
            mem_sha_s, _ = timed(lambda: hashlib.sha256(zeros), [], False, 1)
            del zeros
            result["parts"][state] = {
                "train_idx_sequential_read_s": read_s, "train_idx_sha256_s": sha_s,
                "sha256_over_read_ratio": sha_s / read_s, "sha256_in_memory_s": mem_sha_s,
                "record_sample_digest_s": sample_s, "stat_s": stat_s, "dataset_provenance_s": total_s,
                "runs": {"read": read_all, "sha256": sha_all, "sample": sample_all, "total": total_all}}
            rows += [[state, "train.idx sequential read", read_s, f"{idx_bytes / read_s / 1e6:.0f} MB/s"],
                     [state, "train.idx sha256 (streamed)", sha_s, f"{sha_s / read_s:.2f} x read"],
                     [state, f"sampled record digest ({RECORD_SAMPLE})", sample_s, ""],
                     [state, "stat train.rec", stat_s, ""],
                     [state, "dataset_provenance (all)", total_s, f"{total_s / read_s:.2f} x read"]]
        m = min(CHUNK, args.records)
        keys = np.arange(m, dtype=np.int64)
        peek_s, _ = timed(lambda: record_labels(rec, keys, keys * (8 + PAYLOAD)), [], False, args.repeats)
        assert np.array_equal(record_labels(rec, keys[:1000], keys[:1000] * (8 + PAYLOAD)), keys[:1000] // 20)
        result["header_peek"] = {"records": m, "seconds": peek_s, "records_per_s": m / peek_s}
        rows.append(["warm", f"header peek, {m} records", peek_s, f"{m / peek_s / 1e6:.2f} M records/s"])
        result["table"] = table(["cache", "part", "seconds", "note"], rows)
        result["note"] = "measured on a shared machine (other jobs running), 2 cores"
        save(args.name, result)
    finally:
        if not args.keep:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
