"""python -m plugins.face_nms {stats,proxy-subset,extract,select,demo}"""
import argparse
import os
import sys

import numpy as np


def _ratio(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {value}")
    return value


def cmd_stats(args):
    from .recordio_index import load_filtered_index, read_index
    index = read_index(args.rec)
    labels = index.labels
    if args.index:
        labels = labels[np.isin(index.keys, load_filtered_index(args.index, args.rec))]
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    print(f"dataset      {os.path.abspath(args.rec)} ({index.layout} layout)")
    if args.index:
        print(f"index        {args.index}")
    print(f"num_image    {len(labels)}")
    print(f"num_classes  {index.num_classes}   (identities with faces: {len(sizes)})")
    print(f"faces/id     mean {sizes.mean():.2f}  median {int(np.median(sizes))}  max {sizes.max()}  "
          f"single-face identities {int((sizes == 1).sum())}")


def cmd_proxy_subset(args):
    from .proxy_subset import random_subset
    from .recordio_index import read_index, write_idx
    index = read_index(args.rec)
    rows = random_subset(index.labels, args.ratio, args.seed)
    write_idx(args.out, index.keys[rows], index.offsets[rows])
    print(f"wrote {args.out}: {len(rows)} of {len(index)} faces ({len(rows) / len(index):.1%}), "
          f"{len(np.unique(index.labels[rows]))} identities, seed {args.seed}")


def cmd_extract(args):
    import torch
    from .extract import OnnxModel, extract_features, load_checkpoint_model
    if bool(args.onnx) == bool(args.checkpoint):
        sys.exit("extract: give --checkpoint model.pt --network NAME (arcface_torch) or --onnx model.onnx")
    device = args.device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if args.onnx:
        model = OnnxModel(args.onnx, device)
    else:
        if not args.network:
            sys.exit("extract: --checkpoint needs --network (r18, r50, r100, mbf, ...)")
        insightface = os.environ.get("INSIGHTFACE_DIR")
        if insightface:
            sys.path.insert(0, os.path.join(insightface, "recognition", "arcface_torch"))
        model = load_checkpoint_model(args.network, args.checkpoint, device, args.embedding_size, not args.fp32)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    done = extract_features(args.rec, args.out, model, batch_size=args.batch_size, workers=args.workers,
                            flip=args.flip, chunk_rows=args.chunk_rows, max_chunks=args.max_chunks,
                            overwrite=args.overwrite, log=print if rank0 else None)
    if not done and rank0:
        print(f"stopped before the end; run the same command again to continue ({args.out})")


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _workers(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0: decode in the main process), got {text!r}")
    return value


def default_workers(cap=16):
    """Decoding processes: the CPUs this process may run on, at most ``cap``."""
    return max(1, min(len(os.sched_getaffinity(0)), cap))


def cmd_select(args):
    from .extract import load_features
    from .recordio_index import image_records, write_idx
    from .report import write_report
    from .select import run_method
    if (args.ratio is None) == (args.threshold is None) and args.method in ("nms", "local"):
        sys.exit("select: give --ratio R or --threshold T")
    feats, labels, keys, meta = load_features(args.features, args.rec)
    centers = np.load(args.centers) if args.centers else None
    kw = dict(seed=args.seed)
    if args.method != "random":
        kw.update(device=args.device, chunk_rows=args.chunk_rows, centers=centers)
    if args.method in ("nms", "local"):
        kw.update(threshold=args.threshold, progress=True)
    try:
        sel = run_method(args.method, feats, labels, ratio=args.ratio, order=args.order, **kw)
    except ValueError as exc:
        raise ValueError(f"{args.features}: {exc}") from None
    # load_features checked that the rows are these image records, in this order
    _, rec_keys, rec_offsets = image_records(args.rec)
    write_idx(args.out, rec_keys[sel.keep], rec_offsets[sel.keep])
    info = write_report(args.out, sel, labels)
    thr = f"threshold {sel.threshold:.4f}, " if sel.threshold is not None else ""
    print(f"wrote {args.out}: {thr}kept {sel.kept} of {sel.total} faces ({sel.fraction:.2%}) "
          f"[{args.method}, {sel.order}]; summary {os.path.splitext(args.out)[0]}.json")
    return info


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.work_dir, ratio=args.ratio)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m plugins.face_nms", description=__doc__.splitlines()[0] +
                                ": Face-NMS core-set selection for arcface_torch RecordIO datasets.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stats", help="count faces and identities of a RecordIO folder (or of a filtered index)")
    s.add_argument("--rec", required=True, help="folder with train.rec and train.idx")
    s.add_argument("--index", help="a filtered .idx of that folder")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("proxy-subset", help="per-identity random sample for training the proxy model")
    s.add_argument("--rec", required=True, help="folder with train.rec and train.idx")
    s.add_argument("--ratio", type=_ratio, required=True, help="fraction of each identity's faces (>= 1 kept)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="filtered .idx to write")
    s.set_defaults(func=cmd_proxy_subset)

    s = sub.add_parser("extract", help="proxy-model features of every image record (resumable, torchrun-able)")
    s.add_argument("--rec", required=True, help="folder with train.rec and train.idx")
    s.add_argument("--out", required=True, help="output folder (features.npy, labels.npy, keys.npy, meta.json): "
                   "new, empty, or an extraction of the same dataset, model and flip to resume")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an extraction of another dataset, model or flip found in --out (default: refuse)")
    s.add_argument("--checkpoint", help="arcface_torch model.pt (with --network)")
    s.add_argument("--network", help="arcface_torch network name of the checkpoint (r50, r100, ...)")
    s.add_argument("--embedding-size", type=_positive, default=512,
                   help="feature size the checkpoint was trained with (default: %(default)s)")
    s.add_argument("--onnx", help="ONNX recognition model (insightface model_zoo)")
    s.add_argument("--flip", action="store_true", help="add the feature of the mirrored image (default: off)")
    s.add_argument("--batch-size", type=_positive, default=256, help="images per forward pass (default: %(default)s)")
    s.add_argument("--workers", type=_workers, default=default_workers(),
                   help="decoding processes (default: the CPUs available, at most 16: %(default)s)")
    s.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: %(default)s)")
    s.add_argument("--fp32", action="store_true", help="no AMP on the GPU (default: AMP on)")
    s.add_argument("--chunk-rows", type=_positive, default=1 << 15,
                   help="rows per resumable chunk (default: %(default)s)")
    s.add_argument("--max-chunks", type=_positive,
                   help="stop after this many chunks per rank; rerun to continue (default: all)")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("select", help="Face-NMS selection, written as a filtered .idx + summary + plots")
    s.add_argument("--features", required=True, help="folder written by extract")
    s.add_argument("--rec", required=True, help="the RecordIO folder the features were extracted from")
    s.add_argument("--ratio", type=_ratio, help="kept fraction wanted (the threshold is searched)")
    s.add_argument("--threshold", type=float, help="NMS cosine threshold")
    s.add_argument("--method", default="nms", choices=["nms", "random", "global", "local"],
                   help="nms (Face-NMS), or an ablation: random, global (rank only), local (NMS in random order)")
    s.add_argument("--order", default="hard-first", choices=["hard-first", "easy-first", "random"])
    s.add_argument("--centers", help=".npy of num_classes x d identity centers (e.g. PartialFC weights)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="torch device of the matrix products (default cuda if present)")
    s.add_argument("--chunk-rows", type=int, default=1 << 16, help="rows read per block")
    s.add_argument("--out", required=True, help="filtered .idx to write (e.g. <rec>/../train_facenms60.idx)")
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("demo", help="generate a small RecordIO set with near-duplicate bursts and select from it")
    s.add_argument("--work-dir", help="where to write it (default: a new temporary folder)")
    s.add_argument("--ratio", type=_ratio, default=0.6)
    s.set_defaults(func=cmd_demo)

    args = p.parse_args(argv)
    from .recordio_index import RecordIOError
    try:
        args.func(args)
    except (RecordIOError, ValueError, FileNotFoundError, FloatingPointError) as exc:
        sys.exit(f"face_nms {args.command}: error: {exc}")


def _cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
