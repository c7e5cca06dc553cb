"""Checks the command line runs before any work: option values, outputs that would replace an
input, outputs that cannot be written, input files that cannot be read.

``UsageError`` (exit status 2) is a command line that is wrong by itself; the other errors
(``ValueError``, ``OSError``: exit status 1) are about the files it names.
"""
import argparse
import contextlib
import errno
import json
import math
import os
import re
import tempfile

import numpy as np

from . import files

FEATURE_FILES = ("features.npy", "labels.npy", "keys.npy", "meta.json")
# what extract writes into its --out folder besides FEATURE_FILES
EXTRACT_STATE = ("features.npy.partial", "run.json", "progress")


class UsageError(Exception):
    """A command line that cannot be right whatever the files hold."""


# ---- option types (argparse turns their ArgumentTypeError into a usage error) ----

def ratio(text):
    """r, the kept fraction: a number in (0, 1]."""
    value = _number(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def threshold(text):
    """T, the NMS cosine threshold: a cosine, in [-1, 1]."""
    value = _number(text, "a cosine in [-1, 1]")
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine in [-1, 1], got {text}")
    return value


def seed(text):
    value = _integer(text, "a non-negative integer below 2**63")
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer below 2**63, got {text}")
    return value


def positive(text):
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _number(text, what):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _integer(text, what):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def check_device(device, option="--device"):
    """A torch device this machine has."""
    if device is None:
        return
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {device}: this machine has no usable CUDA GPU; use {option} cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif d.type != "cpu":
        raise UsageError(f"{option} {device}: use cpu, cuda or cuda:N")


# ---- no output may replace an input ----

same_file = files.same_file


class _Tree(str):
    """An input folder no output may be written into (an image folder dataset), not only replaced."""


def dataset_files(rec_dir):
    """The dataset's files no output may replace: train.rec and train.idx, or, for an image folder, every path
    inside it."""
    from .datasets import is_recordio
    if os.path.isdir(rec_dir) and not is_recordio(rec_dir):
        return [(_Tree(rec_dir), f"inside the image folder {rec_dir}, the dataset")]
    return [(os.path.join(rec_dir, "train.rec"), "the dataset's train.rec"),
            (os.path.join(rec_dir, "train.idx"), "the dataset's train.idx")]


def subset_name(path, rec_dir, option="--out"):
    """A filtered set of an image folder is a .txt list of image paths; one of a RecordIO dataset an .idx
    (never a .txt, which would be read as a list of image paths)."""
    from .datasets import is_recordio
    if path and os.path.isdir(rec_dir) and not is_recordio(rec_dir) and not path.endswith(".txt"):
        raise UsageError(f"{option} {path}: a filtered set of the image folder {rec_dir} is a list of its image "
                         f"paths; name it .txt")
    if path and is_recordio(rec_dir) and path.lower().endswith(".txt"):
        raise UsageError(f"{option} {path}: a filtered set of the RecordIO dataset {rec_dir} is an index of its "
                         f"train.rec (key<TAB>offset lines), not a .txt list of image paths; name it .idx")


def feature_files(feature_dir):
    return [(os.path.join(feature_dir, name), f"the features' {name}") for name in FEATURE_FILES]


def refuse_replacing(outputs, inputs, option="--out"):
    """UsageError when an output path resolves to an input. ``outputs`` are paths the command
    would write, the first being ``option`` itself; ``inputs`` are (path, description) pairs."""
    from .datasets import inside
    for out in outputs:
        for path, what in inputs:
            if isinstance(path, _Tree) and inside(out, path):
                raise UsageError(f"{option} {out} is {what}: no output is ever written into the dataset; choose "
                                 f"another {option} outside it")
            if same_file(out, path):
                via = "" if out == outputs[0] else f" would write {out}, which"
                where = "" if out == path else f" ({path})"
                raise UsageError(f"{option} {outputs[0]}{via} is {what}{where}: writing it would replace an "
                                 f"input; choose another {option}")


def refuse_sharing(outputs, others, option, other_option):
    """UsageError when an output of ``option`` is also one of ``others``, the outputs of ``other_option``."""
    for out in outputs:
        for path in others:
            if same_file(out, path):
                via = "" if out == outputs[0] else f" would write {out}, which"
                raise UsageError(f"{option} {outputs[0]}{via} is an output of {other_option} too"
                                 f"{'' if out == path else f' ({path})'}: one file cannot hold both; choose "
                                 f"another {option}")


index_outputs = files.index_family


def refuse_foreign_member(path, option, own=()):
    """UsageError when ``path`` (a report .json or a page .html) is the summary or page of a filtered
    index beside it that this run does not write (``own``): the training filter would read it as such."""
    stem, ext = os.path.splitext(path)
    idx = stem + ".idx"
    if ext in (".json", ".html") and os.path.isfile(idx) and not any(same_file(idx, o) for o in own if o):
        what = "summary" if ext == ".json" else "page"
        raise UsageError(f"{option} {path} is the {what} of the filtered index {idx}, which the training filter and "
                         f"gallery read with it; choose another {option}")




# ---- outputs that can be written ----

def writable_file(path, option="--out"):
    """An output file: a new name or a regular file (links followed), not a folder, a name the
    filesystem allows, in an existing folder this process can create its temporary in."""
    if not path:
        raise UsageError(f"{option} is empty: give a file name")
    choose = option.split()[0]
    folder = os.path.dirname(os.path.abspath(path))
    limit = files.name_max(folder) if os.path.isdir(folder) else 255
    size = len(os.path.basename(path).encode())
    if size > limit:
        raise UsageError(f"{option} {path}: the name is {size} bytes, more than this filesystem allows ({limit}); "
                         f"choose a shorter {choose}")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise IsADirectoryError(f"{option} {path} is a folder: give a file name in it")
    what = files.not_regular(path)
    if what:
        raise FileExistsError(_not_regular(f"{option} {path}", what, f"choose another {choose}"))
    real = os.path.realpath(path)
    _writable_folder(os.path.dirname(real), option, path, create=False, probe=files.temporary_name(real, ".html"))
    if os.path.exists(path):
        try:
            open(path, "r+b").close()  # opens for writing, changes nothing
        except PermissionError as exc:
            if exc.errno == errno.EPERM:  # immutable or append-only: even root cannot replace it
                raise PermissionError(f"{option} {path} cannot be replaced ({exc.strerror}); choose another "
                                      f"{option}") from None


def regular_or_absent(paths, option):
    """Refuses, before any work, outputs that a command writes into a folder when one is not a regular file."""
    for path in paths:
        what = files.not_regular(path)
        if what:
            raise FileExistsError(_not_regular(f"{option}: {path}", what,
                                               f"remove it or choose another {option.split()[0]}"))


def _not_regular(named, what, fix):
    if what.startswith("a link to nothing"):
        return f"{named} is {what}: writing it would replace the link itself; {fix}"
    return f"{named} is {what}, not a regular file: writing it would replace that; {fix}"


def writable_folder(path, option="--out"):
    """An output folder: not a file; it, or the nearest existing folder above it, is writable."""
    if not path:
        raise UsageError(f"{option} is empty: give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{option} {path} is a file: give a folder")
    _writable_folder(os.path.abspath(path), option, path, create=True)


def _writable_folder(folder, option, path, create, probe=None):
    """``probe``: the temporary name the output will be written under, made and removed here so
    that a name too long for the filesystem or a folder refusing it is found before the work."""
    probe_in = folder
    if create:
        while not os.path.exists(probe_in):
            probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        if os.path.exists(probe_in):
            raise NotADirectoryError(f"{option} {path}: {probe_in} is a file, not a folder")
        raise FileNotFoundError(f"{option} {path}: folder {probe_in} does not exist; create it first or "
                                f"choose another {option}")
    try:
        if probe is None:
            fd, probe = tempfile.mkstemp(prefix=".face_nms-write-test-", dir=probe_in)
        else:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{option} {path}: the temporary name {probe} is too long for this filesystem; choose a "
                             f"shorter {option.split()[0]}") from None
        raise PermissionError(f"{option} {path}: folder {probe_in} is not writable ({exc.strerror}); "
                              f"choose a writable folder") from None
    os.close(fd)
    os.remove(probe)


# ---- input files that can be read ----

def input_file(path, option, what="file"):
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path} is a folder: give the {what}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path} not found: check the path")


def load_centers(path):
    """C, the num_classes x d identity centers of ``--centers``: a finite 2-D .npy, no zero row."""
    input_file(path, "--centers", ".npy file")
    try:
        centers = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"--centers {path} is not a .npy array file ({exc}); save the centers with numpy.save")
    if centers.ndim != 2 or not np.issubdtype(centers.dtype, np.number):
        raise ValueError(f"--centers {path} holds a {centers.dtype} array of shape {centers.shape}; it must be "
                         f"num_classes x d numbers")
    centers = np.asarray(centers, np.float32)
    norms = np.linalg.norm(centers, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise ValueError(f"--centers {path}: {len(bad)} row(s), the first row {int(bad[0])}, are not finite or all "
                         f"zero, so they have no direction; fix the centers or leave --centers out")
    return centers


def check_feature_folder(feature_dir):
    """A finished extraction's files can be read: meta.json is a JSON object with a count, the
    arrays are .npy files. A missing features.npy or meta.json is left to ``load_features``."""
    meta_path = os.path.join(feature_dir, "meta.json")
    if not (os.path.isfile(meta_path) and os.path.exists(os.path.join(feature_dir, "features.npy"))):
        return
    again = "extract again into a new folder"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}); the extraction is damaged: {again}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("count"), int):
        raise ValueError(f"{meta_path} has no integer 'count' of features; the extraction is damaged: {again}")
    for name in FEATURE_FILES[:3]:
        path = os.path.join(feature_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; the extraction is incomplete: {again}")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a .npy array file ({exc}); the extraction is damaged: {again}") from None
        native_array(path, array, "f" if name == "features.npy" else "iu")


def native_array(path, array, kinds):
    """Refuses an array of another byte order than this machine's, or of another kind of number
    (``kinds``: numpy dtype kinds), as extract writes none: every command reads them alike."""
    dtype = array.dtype
    if dtype.kind not in kinds:
        what = "float features" if kinds == "f" else "integer labels and keys"
        raise ValueError(f"{path} holds {dtype} values, not {what} as extract writes them; extract again")
    if not dtype.isnative:
        order = "big-endian" if dtype.byteorder == ">" else "little-endian"
        native = "<" if np.dtype("=i2").str[0] == "<" else ">"
        raise ValueError(f"{path} holds {order} values ({dtype.str}), not this machine's byte order: convert it with "
                         f"np.save(path, np.load(path).astype('{native}{dtype.str[1:]}')) or extract again")


def rec_folder(rec_dir):
    either = "a folder holding train.rec and train.idx, or an image folder (one sub-folder per identity)"
    if os.path.isfile(rec_dir):
        raise NotADirectoryError(f"--rec {rec_dir} is a file: give {either}")
    if not os.path.exists(rec_dir):
        raise FileNotFoundError(f"--rec {rec_dir} not found: give {either}")


def feature_folder(feature_dir):
    if os.path.isfile(feature_dir):
        raise NotADirectoryError(f"--features {feature_dir} is a file: give the folder written by extract")


# ---- per command ----

def check_stats(args):
    rec_folder(args.rec)
    if args.index and os.path.isdir(args.index):
        raise IsADirectoryError(f"--index {args.index} is a folder: give the .idx file")


def check_proxy_subset(args):
    rec_folder(args.rec)
    subset_name(args.out, args.rec)
    refuse_replacing(index_outputs(args.out), dataset_files(args.rec))
    writable_file(args.out)
    regular_or_absent(index_outputs(args.out)[1:], f"--out {args.out}")


def check_select(args):
    """Everything ``select`` can know before reading the features; returns the centers."""
    if args.method in ("nms", "local"):
        if (args.ratio is None) == (args.threshold is None):
            raise UsageError(f"--method {args.method} needs exactly one of --ratio R (the kept fraction) or "
                             f"--threshold T (the NMS cosine)")
    elif args.ratio is None or args.threshold is not None:
        raise UsageError(f"--method {args.method} keeps a fraction of each identity: give --ratio R "
                         f"and no --threshold")
    check_device(args.device)
    rec_folder(args.rec)
    feature_folder(args.features)
    outputs = index_outputs(args.out)  # select writes the whole family
    subset_name(args.out, args.rec)
    inputs = dataset_files(args.rec) + feature_files(args.features)
    if args.centers:
        inputs.append((args.centers, "the --centers file"))
    refuse_replacing(outputs, inputs)
    if os.path.normcase(os.path.abspath(outputs[0])) == os.path.normcase(os.path.abspath(outputs[1])):
        raise UsageError(f"--out {args.out} would be replaced by its own summary {outputs[1]}; name the index "
                         f"with .idx")
    for path in outputs:
        writable_file(path, "--out" if path == args.out else f"--out {args.out}: output")
    if args.tmp_dir:
        if not os.path.isdir(args.tmp_dir):
            raise NotADirectoryError(f"--tmp-dir {args.tmp_dir} is not a folder: give an existing folder")
        _writable_folder(os.path.abspath(args.tmp_dir), "--tmp-dir", args.tmp_dir, create=False)
    check_feature_folder(args.features)
    return load_centers(args.centers) if args.centers else None


def check_extract(args):
    """Model and number options, and an --out folder of its own, writable, holding no input."""
    if bool(args.onnx) == bool(args.checkpoint):
        raise UsageError("give --checkpoint model.pt --network NAME (arcface_torch) or --onnx model.onnx, "
                         "one of the two")
    if args.checkpoint and not args.network:
        raise UsageError("--checkpoint needs --network, the arcface_torch name of its network (r18, r50, r100, "
                         "mbf, ...)")
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--chunk-rows", args.chunk_rows, 1),
                                 ("--embedding-size", args.embedding_size, 1), ("--workers", args.workers, 0),
                                 ("--max-chunks", args.max_chunks, 1)):
        if value is not None and value < least:
            raise UsageError(f"{option} must be {'a positive' if least else 'a non-negative'} integer, got {value}")
    if args.chunk_rows < args.batch_size:
        raise UsageError(f"--chunk-rows {args.chunk_rows} is smaller than --batch-size {args.batch_size}; "
                         f"a chunk holds whole batches: raise --chunk-rows or lower --batch-size")
    check_device(args.device)
    rec_folder(args.rec)
    if not args.out:
        raise UsageError("--out is empty: give a folder")
    out = os.path.abspath(args.out)
    rec = os.path.realpath(args.rec)
    if os.path.isdir(out) and (same_file(out, rec) or rec.startswith(os.path.realpath(out).rstrip(os.sep) + os.sep)):
        # the folder is extract's own (resume state, progress/, cleared to start again): never the dataset's
        what, example = (("is", args.out.rstrip(os.sep) + "_features") if same_file(out, rec) else
                         ("holds", os.path.join(args.out, "features")))
        raise UsageError(f"--out {args.out} {what} the dataset folder {args.rec}; give extract a folder of its own, "
                         f"e.g. {example}")
    inputs = dataset_files(args.rec) + [(p, f"the model {p}") for p in (args.checkpoint, args.onnx) if p]
    written = [os.path.join(args.out, name) for name in FEATURE_FILES + EXTRACT_STATE]
    refuse_replacing([args.out] + written, inputs)
    writable_folder(args.out)
    regular_or_absent(written[:-1] + [os.path.join(args.out, ".extract.lock")], f"--out {args.out}")
    progress = os.path.join(args.out, EXTRACT_STATE[-1])
    if os.path.lexists(progress) and (os.path.islink(progress) or not os.path.isdir(progress)):
        raise FileExistsError(f"--out {args.out}: {progress} is {files.not_regular(progress) or 'a file'}, not the "
                              f"folder extract keeps its progress in; remove it or choose another --out")
    model = args.checkpoint or args.onnx
    input_file(model, "--checkpoint" if args.checkpoint else "--onnx", "model file")


def non_negative(text):
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def check_gallery(args):
    """The index, features and dataset named; an --out .html that is none of them, in a writable folder."""
    rec_folder(args.rec)
    feature_folder(args.features)
    if not args.index:
        raise UsageError("--index is empty: give the filtered .idx file")
    input_file(args.index, "--index", ".idx file")
    inputs = dataset_files(args.rec) + feature_files(args.features) + [
        (args.index, "the --index file"), (os.path.splitext(args.index)[0] + ".json", "the summary of --index")]
    refuse_replacing([args.out], inputs)
    refuse_foreign_member(args.out, "--out", own=[args.index])
    writable_file(args.out)
    check_feature_folder(args.features)


def check_conflicts(args):
    """Everything ``conflicts`` can know before reading the features; returns the centers."""
    from .conflicts import conflict_outputs
    cuda = bool(args.device) and str(args.device).startswith("cuda")
    if cuda and args.method == "ivf":
        raise UsageError(f"--method ivf runs on the CPU; the search on --device {args.device} is exact: "
                         f"leave --method out or use --device cpu")
    if (cuda or args.method == "exact") and (args.nlist or args.nprobe):
        raise UsageError(f"--nlist and --nprobe set the CPU's IVF search; this search is exact "
                         f"({'--method exact' if args.method == 'exact' else '--device ' + str(args.device)}): "
                         f"leave them out")
    check_device(args.device)
    rec_folder(args.rec)
    feature_folder(args.features)
    drop_summary = os.path.splitext(args.drop)[0] + ".json" if args.drop else None
    own = len(conflict_outputs(args.out))  # the summary, its tables and its page
    outputs = conflict_outputs(args.out) + (index_outputs(args.drop) if args.drop else [])
    inputs = dataset_files(args.rec) + feature_files(args.features)
    if args.centers:
        inputs.append((args.centers, "the --centers file"))
    refuse_replacing(outputs[:own], inputs)
    if not args.out.endswith(".json"):
        raise UsageError(f"--out {args.out}: name the summary with .json (the CSV tables go beside it)")
    if args.drop:
        subset_name(args.drop, args.rec, "--drop")
        refuse_replacing(outputs[own:], inputs, "--drop")
        if args.drop.endswith(".json"):
            raise UsageError(f"--drop {args.drop}: name the index .idx (its summary <stem>.json goes beside it)")
        refuse_sharing(outputs[own:], outputs[:own], "--drop", "--out")
    refuse_foreign_member(args.out, "--out", own=[args.drop])
    for path in outputs[:own + 2]:
        writable_file(path, "--drop" if path == args.drop else "--out" if path == args.out else
                      f"--drop {args.drop}: summary" if path == drop_summary else f"--out {args.out}: output")
    regular_or_absent(outputs[own + 2:], f"--drop {args.drop}")
    check_feature_folder(args.features)
    return load_centers(args.centers) if args.centers else None


def check_overlap(args):
    """Model options, the inputs (features, dataset, .bin files, model) and outputs that replace none of them."""
    if bool(args.onnx) == bool(args.checkpoint):
        raise UsageError("give the model of the features: --checkpoint model.pt --network NAME or --onnx model.onnx, "
                         "one of the two")
    if args.checkpoint and not args.network:
        raise UsageError("--checkpoint needs --network, the arcface_torch name of its network (r18, r50, r100, ...)")
    check_device(args.device)
    rec_folder(args.rec)
    feature_folder(args.features)
    model = args.checkpoint or args.onnx
    inputs = dataset_files(args.rec) + feature_files(args.features) + [(model, f"the model {model}")]
    from .eval_bin import check_file
    for i, path in enumerate(args.bin):
        input_file(path, "--bin", "evaluation .bin file")
        check_file(path)
        if any(same_file(path, other) for other in args.bin[:i]):
            raise UsageError(f"--bin {path} is given twice; give each evaluation set once")
        inputs.append((path, f"the evaluation set {path}"))
    from .overlap import overlap_outputs
    outputs = [args.out]
    page = overlap_outputs(args.out)[1]
    if args.exclude:
        if same_file(args.exclude, args.out) or args.exclude.endswith(".json"):
            raise UsageError(f"--exclude {args.exclude}: name the index .idx (its summary <stem>.json goes beside it) "
                             f"and the report --out .json")
        subset_name(args.exclude, args.rec, "--exclude")
        outputs += index_outputs(args.exclude)
    refuse_replacing([args.out, page], inputs)
    if args.exclude:
        refuse_replacing(outputs[1:], inputs, "--exclude")
    refuse_foreign_member(args.out, "--out", own=[args.exclude])
    for path in dict.fromkeys(outputs[:3] + [page]):
        writable_file(path, "--out" if path == args.out else "--exclude" if path == args.exclude else
                      f"--out {args.out}: page" if path == page else f"--exclude {args.exclude}: summary")
    regular_or_absent(outputs[3:], f"--exclude {args.exclude}")
    input_file(model, "--checkpoint" if args.checkpoint else "--onnx", "model file")
    check_feature_folder(args.features)


def check_combine(args):
    """Two or more --index files of the dataset, each once; an --out .idx that replaces none of them."""
    from .combine import combined_outputs
    rec_folder(args.rec)
    if len(args.index) < 2:
        raise UsageError("give two or more --index files to combine (the records in every one are kept)")
    inputs = dataset_files(args.rec)
    for i, path in enumerate(args.index):
        if not path:
            raise UsageError("--index is empty: give a filtered .idx file")
        input_file(path, "--index", ".idx file")
        if any(same_file(path, other) for other in args.index[:i]):
            raise UsageError(f"--index {path} is given twice; give each filtered index once")
        inputs += [(path, f"the --index file {path}"),
                   (os.path.splitext(path)[0] + ".json", f"the summary of --index {path}")]
    subset_name(args.out, args.rec)
    if not args.out.endswith((".idx", ".txt")):
        raise UsageError(f"--out {args.out}: name the combined index .idx (its summary <stem>.json goes beside it)")
    outputs = combined_outputs(args.out)
    refuse_replacing(outputs, inputs)
    for path in outputs:
        writable_file(path, "--out" if path == args.out else f"--out {args.out}: summary")


DEMO_NAMES = ("faces", "features")


def check_demo(args):
    """--work-dir: a new or empty folder, or one an earlier demo wrote."""
    if not args.work_dir:
        return
    writable_folder(args.work_dir, "--work-dir")
    w = args.work_dir
    regular_or_absent([os.path.join(w, "faces", n) for n in ("train.rec", "train.idx")]
                      + [os.path.join(w, "features", n) for n in FEATURE_FILES + EXTRACT_STATE[:-1]]
                      + index_outputs(os.path.join(w, f"train_facenms{int(round(args.ratio * 100))}.idx")), "--work-dir")
    if os.path.isdir(args.work_dir):
        foreign = sorted(n for n in os.listdir(args.work_dir)
                         if n not in DEMO_NAMES and not n.startswith("train_facenms"))
        if foreign:
            raise FileExistsError(f"--work-dir {args.work_dir} holds files the demo did not write "
                                  f"({', '.join(foreign[:3])}); give a new or empty folder")


# ---- one line for any error ----

_HINTS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
          errno.EACCES: "check the permissions or choose another path", errno.EPERM: "check the permissions or "
          "choose another path", errno.EROFS: "the filesystem is read-only: choose another path",
          errno.ENOENT: "check the path", errno.EFBIG: "the file size limit (ulimit -f) is too small for it"}


@contextlib.contextmanager
def writing(name):
    """Names ``name`` (the option and the outputs it names) in an OSError raised without a file
    name (a write to an open file) or with the name of one of this process's temporaries."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and exc.filename is None:
            exc.filename = name
        elif exc.errno is not None and files.output_of(str(exc.filename)) != str(exc.filename):
            exc.filename, exc.filename2 = f"{name} (writing {files.output_of(str(exc.filename))})", None
        raise


def describe(exc):
    """One line for ``exc``: the file and what to do."""
    if isinstance(exc, OSError) and exc.filename is not None:
        # a temporary name beside an output says less than the output's own name
        name = str(exc.filename2 or exc.filename)
        name = re.sub(r"\.tmp-\d+(\.\w+)?$", "", files.output_of(name))
        hint = _HINTS.get(exc.errno)
        text = f"{name}: {exc.strerror}" + (f"; {hint}" if hint else "")
    elif isinstance(exc, MemoryError):
        text = f"out of memory ({exc}); the input is larger than this machine can hold"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
