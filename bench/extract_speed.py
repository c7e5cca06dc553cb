"""Extraction speed: end-to-end faces/s (rec read + decode + forward + write) against forward-only
faces/s of the same model, batch and device. On the CPU a small model; on a GPU the host's r50 in
fp16 (needs INSIGHTFACE_DIR for arcface_torch's backbones)."""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from common import save, table
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import extract_features
from plugins.face_nms.models import TorchModel


def build(network, device, fp16):
    if network == "tiny":
        return TorchModel(TinyNet(), device, fp16)
    insightface = os.environ.get("INSIGHTFACE_DIR")
    if not insightface:
        sys.exit(f"--network {network} needs INSIGHTFACE_DIR (arcface_torch's backbones)")
    sys.path.insert(0, os.path.join(insightface, "recognition", "arcface_torch"))
    from backbones import get_model
    module = get_model(network, dropout=0.0, fp16=False, num_features=512)
    calibrate_batchnorm(module)
    return TorchModel(module, device, fp16)


@torch.no_grad()
def calibrate_batchnorm(module, batches=8):
    """Running statistics from random images: a freshly initialised deep ResNet in eval mode (running
    variance 1) grows its activations block after block until fp16 overflows, which a trained model
    does not; the speed is the same."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    module.train()
    for _ in range(batches):
        module(torch.rand(32, 3, 112, 112) * 2 - 1)
    module.eval()


def forward_only(model, batch, n, repeats):
    """Faces/s of the model alone: one uint8 batch already in (pinned) memory, batches queued back to back."""
    images = torch.randint(0, 255, (batch, 112, 112, 3), dtype=torch.uint8)
    if model.device.type == "cuda":
        images = images.pin_memory()
    for _ in range(3):
        model(images, False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(max(1, n // batch)):
            handle = model.launch(images, False)
        handle.result()
        times.append(max(1, n // batch) * batch / (time.perf_counter() - t0))
    return statistics.median(times)


def end_to_end(model, rec_dir, batch, workers, repeats):
    rates = []
    for _ in range(repeats):
        out = tempfile.mkdtemp(prefix="extract_bench_")
        t0 = time.perf_counter()
        extract_features(rec_dir, out, model, batch_size=batch, workers=workers, chunk_rows=batch * 16,
                         progress=False)
        n = len(np.load(os.path.join(out, "labels.npy")))
        rates.append(n / (time.perf_counter() - t0))
        shutil.rmtree(out)
    return statistics.median(rates)


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--faces", type=int, default=4000 if not cuda else 50000)
    p.add_argument("--network", default="r50" if cuda else "tiny", help="tiny (built in) or an arcface_torch name")
    p.add_argument("--batch-size", type=int, default=64 if not cuda else 256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count()))
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="extract_bench_rec_")
    # at most ~5000 distinct faces, repeated: decoding costs the same, generation much less
    images, labels, _ = synthetic_faces(n_ids=max(1, min(args.faces, 5000) // 11), seed=0)
    reps = int(np.ceil(args.faces / len(images)))
    images, labels = np.concatenate([images] * reps)[:args.faces], np.concatenate([labels] * reps)[:args.faces]
    write_recordio(work, images, labels, "im2rec", shuffle_seed=0)
    model = build(args.network, args.device, fp16=args.device.startswith("cuda"))
    fwd = forward_only(model, args.batch_size, args.faces, args.repeats)
    e2e = end_to_end(model, work, args.batch_size, args.workers, args.repeats)
    shutil.rmtree(work)
    text = table(["device", "network", "batch", "workers", "forward-only faces/s", "end-to-end faces/s",
                  "end-to-end / forward"],
                 [[args.device, args.network, args.batch_size, args.workers, fwd, e2e, e2e / fwd]])
    save(f"extract_speed_{'gpu' if args.device.startswith('cuda') else 'cpu'}",
         {"params": vars(args), "forward_faces_per_s": fwd, "end_to_end_faces_per_s": e2e, "ratio": e2e / fwd,
          "table": text})


if __name__ == "__main__":
    main()
