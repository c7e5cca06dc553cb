"""python -m plugins.face_nms {stats,proxy-subset,extract,select,gallery,conflicts,overlap,combine,demo}"""
import os
import signal
import sys


def _interrupted_early(signum, frame):
    # Ctrl-C (or SIGTERM) while numpy and torch import or the command line is parsed: nothing to clean up yet
    os.write(2, b"interrupted\n")
    os._exit(130)


if __name__ == "__main__":  # before the heavy imports
    signal.signal(signal.SIGINT, _interrupted_early)
    signal.signal(signal.SIGTERM, _interrupted_early)

import argparse  # noqa: E402
import copy  # noqa: E402

import numpy as np  # noqa: E402

from . import guards  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """Errors in one line, and every default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{_name(self.prog)}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _format_action(self, action):
        if action.help is None and self._has_default(action):
            # argparse prints nothing after an option without help, its default included
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        return super()._get_help_string(action) if self._has_default(action) else action.help

    @staticmethod
    def _has_default(action):
        return (bool(action.option_strings) and not action.required and action.default is not None
                and action.default is not False and action.default != argparse.SUPPRESS)


def _name(prog):
    return prog.replace("python -m plugins.", "")


REC_HELP = ("the dataset: a folder with train.rec and train.idx, or else an image folder (one sub-folder per identity, "
            "as torchvision's ImageFolder reads it)")


def cmd_stats(args):
    guards.check_stats(args)
    from .datasets import open_dataset
    from .files import reading_set
    ds = open_dataset(args.rec)
    labels = ds.labels
    if args.index:
        from .filter import check_index_dataset
        with reading_set(args.index):
            rows = ds.subset_rows(args.index)
            check_index_dataset(args.index, ds, ds.keys[rows])
        labels = labels[np.sort(rows)]
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    print(f"dataset      {os.path.abspath(args.rec)} ({ds.layout} layout)")
    if args.index:
        print(f"index        {args.index}")
    print(f"num_image    {len(labels)}")
    print(f"num_classes  {ds.num_classes}   (identities with faces: {len(sizes)})")
    print(f"faces/id     mean {sizes.mean():.2f}  median {int(np.median(sizes))}  max {sizes.max()}  "
          f"single-face identities {int((sizes == 1).sum())}")


def cmd_proxy_subset(args):
    from .datasets import open_dataset
    from .proxy_subset import write_proxy_subset
    guards.check_proxy_subset(args)
    ds = open_dataset(args.rec)
    with guards.writing(f"--out {args.out} or its summary"):
        rows = write_proxy_subset(args.out, ds, args.ratio, args.seed)
    print(f"wrote {args.out}: {len(rows)} of {len(ds)} faces ({len(rows) / len(ds):.1%}), "
          f"{len(np.unique(ds.labels[rows]))} identities, seed {args.seed}; summary "
          f"{os.path.splitext(args.out)[0]}.json")


def cmd_extract(args):
    guards.check_extract(args)
    import torch
    from .extract import extract_features
    from .models import load_model
    device = args.device
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model = load_model(args.checkpoint, args.network, args.embedding_size, args.onnx, device, not args.fp32)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    done = extract_features(args.rec, args.out, model, batch_size=args.batch_size, workers=args.workers,
                            flip=args.flip, chunk_rows=args.chunk_rows, max_chunks=args.max_chunks,
                            overwrite=args.overwrite, log=print if rank0 else None)
    if not done and rank0:
        print(f"stopped before the end; run the same command again to continue ({args.out})")


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
    from .datasets import open_dataset
    from .features import load_features
    from .gallery import selection_writer
    from .report import write_selection
    from .select import run_method
    centers = guards.check_select(args)
    ds = open_dataset(args.rec)
    feats, labels, keys, meta = load_features(args.features, ds)
    kw = dict(seed=args.seed)
    if args.method != "random":
        kw.update(device=args.device, chunk_rows=args.chunk_rows, centers=centers,
                  spill_dir=args.tmp_dir or os.path.dirname(os.path.abspath(args.out)),
                  log=lambda line: print(f"face_nms select: {line}", file=sys.stderr))
    if args.method in ("nms", "local"):
        kw.update(threshold=args.threshold, progress=True)
    try:
        sel = run_method(args.method, feats, labels, ratio=args.ratio, order=args.order, **kw)
    except ValueError as exc:
        raise ValueError(f"{args.features}: {exc}") from None
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # a write to a regrouping file: the one folder written
            exc.filename = (f"--tmp-dir {args.tmp_dir} (where the features are regrouped)" if args.tmp_dir else
                            f"--out {args.out}: its folder, where the features are regrouped without --tmp-dir")
        raise
    for line in sel.warnings:
        print(f"face_nms select: warning: {line}", file=sys.stderr)
    # load_features checked that the rows are these face records, in this order
    page = selection_writer(ds, feats, labels, ds.keys, None, sel, args.out, ids=args.gallery_ids,
                            seed=args.seed, centers=centers,
                            log=lambda line: print(f"face_nms select: {line}", file=sys.stderr))
    with guards.writing(f"--out {args.out} or the summary, plots and page beside it"):
        info = write_selection(args.out, ds.keys[sel.keep], None, sel, labels,
                               dataset=meta.get("provenance", {}).get("dataset"), page=page,
                               write=lambda path: ds.write_subset(path, sel.keep))
    thr = f"threshold {sel.threshold:.4f}, " if sel.threshold is not None else ""
    print(f"wrote {args.out}: {thr}kept {sel.kept} of {sel.total} faces ({sel.fraction:.2%}) "
          f"[{args.method}, {sel.order}]; summary {os.path.splitext(args.out)[0]}.json, page "
          f"{os.path.splitext(args.out)[0]}.html")
    return info


def cmd_gallery(args):
    from .gallery import write_index_page
    guards.check_gallery(args)
    with guards.writing(f"--out {args.out}"):
        print(write_index_page(args.rec, args.features, args.index, args.out, ids=args.gallery_ids, seed=args.seed))


def cmd_conflicts(args):
    from .conflicts import find_conflicts, write_conflicts
    from .datasets import open_dataset
    from .features import load_features
    centers = guards.check_conflicts(args)
    ds = open_dataset(args.rec)
    feats, labels, keys, meta = load_features(args.features, ds)
    if centers is not None and (centers.shape[1] != feats.shape[1] or len(centers) <= labels.max()):
        raise ValueError(f"--centers {args.centers} has shape {centers.shape}; these features need num_classes x "
                         f"{feats.shape[1]} with num_classes > {int(labels.max())}: give the centers of this dataset")
    res = find_conflicts(feats, labels, threshold=args.threshold, centers=centers, k=args.k, device=args.device,
                         method=args.method, nlist=args.nlist, nprobe=args.nprobe, seed=args.seed,
                         chunk_rows=args.chunk_rows, progress=True,
                         log=lambda line: print(f"face_nms conflicts: {line}", file=sys.stderr))

    def page(path, info, pairs, faces):
        from .conflicts_page import conflicts_page
        with open(path, "w", encoding="utf-8") as f:
            f.write(conflicts_page(f"Identity conflicts: {os.path.basename(args.out)}", info, pairs, faces,
                                   res.face_rows, labels, keys, ds, rows=args.page_rows,
                                   log=lambda line: print(f"face_nms conflicts: {line}", file=sys.stderr)))
    with guards.writing(f"--out {args.out} or the tables and page beside it" +
                        (f", or --drop {args.drop} or its summary" if args.drop else "")):
        # load_features checked: one face record of ds per row, in order
        info = write_conflicts(args.out, res, labels, keys, ds, drop=args.drop, drop_mode=args.drop_mode,
                               extra={"features": os.path.abspath(args.features), "centers": args.centers or "mean "
                                      "features", "dataset": meta.get("provenance", {}).get("dataset")}, page=page)
    for line in info["warnings"]:
        print(f"face_nms conflicts: warning: {line}", file=sys.stderr)
    rule = "given" if args.threshold is not None else res.rule["rule"]
    print(f"threshold {res.threshold:.4f} ({rule}); {info['pairs']} conflicting pairs of {info['identities']} "
          f"identities, {info['flagged_faces']} faces nearer another identity's center "
          f"[{res.search['method']} search]; wrote {args.out}, page {os.path.splitext(args.out)[0]}.html" +
          (f", {args.drop}" if args.drop else ""))
    return info


def cmd_overlap(args):
    from .overlap import run_overlap
    guards.check_overlap(args)
    with guards.writing(f"--out {args.out}" + (f" or --exclude {args.exclude}" if args.exclude else "")):
        r = run_overlap(args.features, args.rec, args.bin, args.out, checkpoint=args.checkpoint, network=args.network,
                        embedding_size=args.embedding_size, onnx=args.onnx, exclude=args.exclude,
                        threshold=args.threshold, device=args.device, batch_size=args.batch_size,
                        log=lambda line: print(line, file=sys.stderr), page_rows=args.page_rows)
    t = r["totals"]
    rule = "given" if args.threshold is not None else "robust equal-error point of the training set"
    print(f"wrote {args.out} (page {os.path.splitext(args.out)[0]}.html): {t['identities']} training identities ({t['training_faces_of_them']} faces) match "
          f"{t['matched_images']} of {t['evaluation_images']} evaluation images at threshold {r['threshold']:.4f} "
          f"({rule}; {r['search']['method']} search)" +
          (f"; exclusion index {args.exclude}: {r['exclusion']['kept']} of {t['training_faces']} faces" if
           args.exclude else ""))
    return r


def cmd_combine(args):
    from .combine import describe_sources, write_combined
    guards.check_combine(args)
    with guards.writing(f"{args.out} or its summary"):
        summary = write_combined(args.rec, args.index, args.out)
    print(f"wrote {args.out}: {summary['kept']} of {summary['total']} faces ({summary['kept_fraction']:.1%}) are in "
          f"every index; {describe_sources(summary)}; summary {os.path.splitext(args.out)[0]}.json")
    return summary


def cmd_demo(args):
    from .demo import run_demo
    guards.check_demo(args)
    run_demo(args.work_dir, ratio=args.ratio)


def main(argv=None):
    p = _Parser(prog="python -m plugins.face_nms", description=__doc__.splitlines()[0] +
                  ": Face-NMS core-set selection for arcface_torch datasets (RecordIO or image folders).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stats", help="count faces and identities of a dataset, RecordIO or image folder (or of a filtered set)")
    s.add_argument("--rec", required=True, help=REC_HELP)
    s.add_argument("--index", help="a filtered set of that dataset (.idx, or .txt for an image folder)")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("proxy-subset", help="per-identity random sample for training the proxy model")
    s.add_argument("--rec", required=True, help=REC_HELP)
    s.add_argument("--ratio", type=guards.ratio, required=True, help="fraction of each identity's faces (>= 1 kept)")
    s.add_argument("--seed", type=guards.seed, default=0)
    s.add_argument("--out", required=True, help="filtered set to write (.idx; .txt of image paths for an image folder)")
    s.set_defaults(func=cmd_proxy_subset)

    s = sub.add_parser("extract", help="proxy-model features of every image record (resumable, torchrun-able)")
    s.add_argument("--rec", required=True, help=REC_HELP)
    s.add_argument("--out", required=True, help="output folder (features.npy, labels.npy, keys.npy, meta.json): "
                   "new, empty, or an extraction of the same dataset, model and flip to resume")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an extraction of another dataset, model or flip found in --out (default: refuse)")
    s.add_argument("--checkpoint", help="arcface_torch model.pt (with --network)")
    s.add_argument("--network", help="arcface_torch network name of the checkpoint (r50, r100, ...)")
    s.add_argument("--embedding-size", type=guards.positive, default=512,
                   help="feature size the checkpoint was trained with (default: %(default)s)")
    s.add_argument("--onnx", help="ONNX recognition model (insightface model_zoo)")
    s.add_argument("--flip", action="store_true", help="add the feature of the mirrored image (default: off)")
    s.add_argument("--batch-size", type=guards.positive, default=256, help="images per forward pass (default: %(default)s)")
    s.add_argument("--workers", type=_workers, default=default_workers(),
                   help="decoding processes (default: the CPUs available, at most 16: %(default)s)")
    s.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: %(default)s)")
    s.add_argument("--fp32", action="store_true", help="no AMP on the GPU (default: AMP on)")
    s.add_argument("--chunk-rows", type=guards.positive, default=1 << 15,
                   help="rows per resumable chunk (default: %(default)s)")
    s.add_argument("--max-chunks", type=guards.positive,
                   help="stop after this many chunks per rank; rerun to continue (default: all)")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("select", help="Face-NMS selection, written as a filtered set (.idx or .txt) + summary + plots + page")
    s.add_argument("--features", required=True, help="folder written by extract")
    s.add_argument("--rec", required=True, help="the dataset (RecordIO or image folder) the features were extracted from")
    s.add_argument("--ratio", type=guards.ratio, help="kept fraction wanted (the threshold is searched)")
    s.add_argument("--threshold", type=guards.threshold, help="NMS cosine threshold, in [-1, 1]")
    s.add_argument("--method", default="nms", choices=["nms", "random", "global", "local"],
                   help="nms (Face-NMS), or an ablation: random, global (rank only), local (NMS in random order)")
    s.add_argument("--order", default="hard-first", choices=["hard-first", "easy-first", "random"])
    s.add_argument("--centers", help=".npy of num_classes x d identity centers (e.g. PartialFC weights)")
    s.add_argument("--seed", type=guards.seed, default=0)
    s.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device of the matrix products")
    s.add_argument("--chunk-rows", type=guards.positive, default=1 << 16, help="rows read per block")
    s.add_argument("--tmp-dir", help="where features larger than memory are regrouped, through temporary files "
                                     "deleted as they are made (default: the folder of --out; the free space is "
                                     "checked first, else the features are read in several passes)")
    s.add_argument("--out", required=True, help="filtered set to write: .idx (e.g. <rec>/../train_facenms60.idx), for an image folder a .txt of image paths")
    s.add_argument("--gallery-ids", type=guards.non_negative, default=24,
                   help="identities shown on the page <out stem>.html (0: numbers and plots only)")
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("gallery", help="HTML page of what a filtered set keeps and drops (faces decoded from the dataset)")
    s.add_argument("--rec", required=True, help=REC_HELP)
    s.add_argument("--features", required=True, help="folder written by extract for that dataset")
    s.add_argument("--index", required=True, help="a filtered set of that dataset, .idx or .txt (select, proxy-subset, ...)")
    s.add_argument("--gallery-ids", type=guards.non_negative, default=24, help="identities shown (0: none)")
    s.add_argument("--seed", type=guards.seed, default=0, help="seed of the histogram's identity sample")
    s.add_argument("--out", required=True, help=".html page to write")
    s.set_defaults(func=cmd_gallery)

    s = sub.add_parser("conflicts", help="identities whose centers are too near (one person under two labels), as "
                                         "JSON + CSV, optionally a filtered .idx without them")
    s.add_argument("--features", required=True, help="folder written by extract")
    s.add_argument("--rec", required=True, help="the dataset (RecordIO or image folder) the features were extracted from")
    s.add_argument("--out", required=True, help="summary .json; <stem>_pairs.csv and <stem>_faces.csv go beside it")
    s.add_argument("--threshold", type=guards.threshold, help="center cosine T in [-1, 1] above which two identities "
                   "conflict (default: median + 6 robust standard deviations of the nearest-other-center cosine)")
    s.add_argument("--centers", help=".npy of num_classes x d identity centers (e.g. PartialFC weights)")
    s.add_argument("--drop", help="also write this filtered set (.idx, or .txt for an image folder) without the conflicting records")
    s.add_argument("--drop-mode", default="identity", choices=["identity", "faces"],
                   help="identity: the smaller identity of each pair; faces: the faces nearer another center")
    s.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (GPU: exact search)")
    s.add_argument("--method", choices=["exact", "ivf"], help="CPU search (default: exact while centers^2 <= 4e9, "
                                                              "else IVF)")
    s.add_argument("--nlist", type=guards.positive, help="IVF cells (default: about sqrt(identities))")
    s.add_argument("--nprobe", type=guards.positive, help="IVF cells searched per center (default: nlist / 8)")
    s.add_argument("--k", type=guards.positive, default=8, help="nearest other centers searched per identity")
    s.add_argument("--seed", type=guards.seed, default=0, help="IVF training sample")
    s.add_argument("--chunk-rows", type=guards.positive, default=1 << 16, help="rows read per block")
    s.add_argument("--page-rows", type=guards.non_negative, default=200,
                   help="pairs and flagged faces shown on the page <out stem>.html, most similar first (the rest "
                        "counted)")
    s.set_defaults(func=cmd_conflicts)

    s = sub.add_parser("overlap", help="training identities that also appear in evaluation .bin files (LFW, ...)")
    s.add_argument("--features", required=True, help="folder written by extract")
    s.add_argument("--rec", required=True, help="the dataset (RecordIO or image folder) the features were extracted from")
    s.add_argument("--bin", required=True, action="append", help="evaluation .bin (repeat: lfw.bin, cfp_fp.bin, ...)")
    s.add_argument("--checkpoint", help="the arcface_torch model.pt the features were extracted with (with --network)")
    s.add_argument("--network", help="arcface_torch network name of the checkpoint")
    s.add_argument("--embedding-size", type=guards.positive, default=512)
    s.add_argument("--onnx", help="the ONNX model the features were extracted with")
    s.add_argument("--threshold", type=guards.threshold,
                   help="cosine to an identity center that counts as a match, in [-1, 1] (default: the equal-error "
                        "point of the training set's own genuine and impostor cosines, reported)")
    s.add_argument("--exclude", help="also write this filtered set (.idx, or .txt for an image folder): the training set without those identities")
    s.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (model and search)")
    s.add_argument("--batch-size", type=guards.positive, default=256)
    s.add_argument("--out", required=True, help="overlap report to write (.json); its page <stem>.html goes beside it")
    s.add_argument("--page-rows", type=guards.non_negative, default=200,
                   help="matched identities shown per .bin on the page, highest cosine first (the rest counted)")
    s.set_defaults(func=cmd_overlap)

    s = sub.add_parser("combine", help="one filtered set of the records in every given set (selection, conflicts "
                                       "drop, overlap exclusion), with its summary")
    s.add_argument("--rec", required=True, help=REC_HELP)
    s.add_argument("--index", required=True, action="append",
                   help="a filtered set of that dataset, .idx or .txt for an image folder (repeat)")
    s.add_argument("--out", required=True, help="combined set to write (.idx, or .txt for an image folder); its "
                                                "summary <stem>.json goes beside it")
    s.set_defaults(func=cmd_combine)

    s = sub.add_parser("demo", help="generate a small RecordIO set with near-duplicate bursts and select from it")
    s.add_argument("--work-dir", help="where to write it (default: a new temporary folder)")
    s.add_argument("--ratio", type=guards.ratio, default=0.6)
    s.set_defaults(func=cmd_demo)

    args = p.parse_args(argv)
    name = f"face_nms {args.command}"
    previous = None
    try:
        if argv is None:
            # the command runs: Ctrl-C and SIGTERM unwind, so that temporary files are removed on the way out
            previous = signal.signal(signal.SIGTERM, _terminated)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return args.func(args)
    except guards.UsageError as exc:
        p.exit(2, f"{name}: error: {guards.describe(exc)}\n")
    except KeyboardInterrupt:
        p.exit(130, "interrupted\n")
    except BrokenPipeError:
        # the reader of the output stopped (`| head`): no error, and no second one when Python flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except ImportError as exc:
        sys.exit(f"{name}: error: {exc}; install the plugin's requirements (./install.sh --deps-only)")
    except RuntimeError as exc:
        # torch (CUDA out of memory, a device error) and faiss report theirs as RuntimeError
        sys.exit(f"{name}: error: {guards.describe(exc)}")
    except (ValueError, OSError, FloatingPointError, MemoryError) as exc:
        # RecordIOError is a ValueError
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            exc.filename = getattr(args, "out", None) or getattr(args, "work_dir", None)
        sys.exit(f"{name}: error: {guards.describe(exc)}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    # unwinds like Ctrl-C, so that temporary files are removed on the way out
    raise KeyboardInterrupt


def _cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
