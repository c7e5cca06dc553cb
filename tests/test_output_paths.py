"""Outputs are new names or regular files; a set of outputs is read whole or not at all, even after a
SIGKILL in its commit; concurrent writers of one set take turns; errors name the option that named the path."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from plugins.face_nms.__main__ import main
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import extract_features
from plugins.face_nms.models import TorchModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset, its features, a filtered index of it, a model file and a .bin file (the guards
    only check that these last two exist before the outputs)."""
    root = tmp_path_factory.mktemp("outpaths")
    images, labels, _ = synthetic_faces(n_ids=6, seed=5)
    rec = str(root / "ds")
    write_recordio(rec, images, labels, "insightface")
    feats = extract_features(rec, str(root / "feats"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=16,
                             workers=0, progress=False)
    idx = str(root / "half.idx")
    assert main(["proxy-subset", "--rec", rec, "--ratio", "0.5", "--out", idx]) is None
    (root / "model.onnx").write_bytes(b"onnx")
    (root / "eval.bin").write_bytes(b"bin")
    return {"root": str(root), "rec": rec, "feats": feats, "idx": idx, "onnx": str(root / "model.onnx"),
            "bin": str(root / "eval.bin")}


def cli(argv, capsys):
    capsys.readouterr()
    try:
        main(argv)
        status = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            status = 1
        else:
            status = exc.code or 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()


def run(args, **kw):
    return subprocess.run([sys.executable, "-m", "plugins.face_nms", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def commands(data, d):
    """(command line, the output path a node is put at, the option that names it) for every output."""
    sel = ["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", "0.6"]
    con = ["conflicts", "--features", data["feats"], "--rec", data["rec"]]
    ovl = ["overlap", "--features", data["feats"], "--rec", data["rec"], "--bin", data["bin"], "--onnx", data["onnx"]]
    return {
        "select": (sel + ["--out", f"{d}/s.idx"], f"{d}/s.idx", "--out"),
        "select-summary": (sel + ["--out", f"{d}/s.idx"], f"{d}/s.json", "--out"),
        "select-page": (sel + ["--out", f"{d}/s.idx"], f"{d}/s.html", "--out"),
        "proxy-subset": (["proxy-subset", "--rec", data["rec"], "--ratio", "0.5", "--out", f"{d}/p.idx"],
                         f"{d}/p.idx", "--out"),
        "proxy-subset-stale-summary": (["proxy-subset", "--rec", data["rec"], "--ratio", "0.5", "--out",
                                        f"{d}/p.idx"], f"{d}/p.json", "--out"),
        "conflicts": (con + ["--out", f"{d}/c.json"], f"{d}/c.json", "--out"),
        "conflicts-csv": (con + ["--out", f"{d}/c.json"], f"{d}/c_pairs.csv", "--out"),
        "conflicts-drop": (con + ["--out", f"{d}/c.json", "--drop", f"{d}/k.idx"], f"{d}/k.idx", "--drop"),
        "conflicts-drop-summary": (con + ["--out", f"{d}/c.json", "--drop", f"{d}/k.idx"], f"{d}/k.json", "--drop"),
        "overlap": (ovl + ["--out", f"{d}/o.json"], f"{d}/o.json", "--out"),
        "overlap-exclude": (ovl + ["--out", f"{d}/o.json", "--exclude", f"{d}/e.idx"], f"{d}/e.idx", "--exclude"),
        "gallery": (["gallery", "--rec", data["rec"], "--features", data["feats"], "--index", data["idx"], "--out",
                     f"{d}/g.html"], f"{d}/g.html", "--out"),
        "extract": (["extract", "--rec", data["rec"], "--out", f"{d}/f", "--onnx", data["onnx"], "--device", "cpu"],
                    f"{d}/f/meta.json", "--out"),
        "demo": (["demo", "--work-dir", f"{d}/w"], f"{d}/w/train_facenms60.idx", "--work-dir"),
    }


def make_node(path, kind, tmp_path):
    """A node that is not a regular file at ``path``; returns a test of whether it still is that node."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
        return lambda: stat.S_ISFIFO(os.lstat(path).st_mode)
    if kind == "char-device":
        if os.geteuid() != 0:
            pytest.skip("only root can make a device node")
        null = os.stat("/dev/null").st_rdev
        os.mknod(path, 0o666 | stat.S_IFCHR, null)
        return lambda: stat.S_ISCHR(os.lstat(path).st_mode) and os.lstat(path).st_rdev == null
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        return lambda: stat.S_ISSOCK(os.lstat(path).st_mode)
    if kind == "link-to-fifo":
        target = str(tmp_path / "elsewhere.fifo")
        os.mkfifo(target)
        os.symlink(target, path)
        return lambda: os.path.islink(path) and stat.S_ISFIFO(os.stat(path).st_mode)
    if kind == "dangling-link":
        os.symlink(str(tmp_path / "nothing-here"), path)
        return lambda: os.path.islink(path) and not os.path.exists(path) and not os.path.lexists(
            tmp_path / "nothing-here")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fifo", "char-device", "socket", "link-to-fifo", "dangling-link"])
@pytest.mark.parametrize("command", list(commands({"feats": "", "rec": "", "bin": "", "onnx": "", "idx": ""}, "")))
def test_an_output_that_is_not_a_regular_file_is_refused(data, capsys, tmp_path, command, kind):
    argv, node, option = commands(data, str(tmp_path))[command]
    still = make_node(node, kind, tmp_path)
    status, lines = cli(argv, capsys)
    assert status in (1, 2) and len(lines) == 1, lines
    line = lines[0]
    assert node in line and option in line and ("regular file" in line or "link" in line), line
    assert still(), (command, kind)
    leftovers = [n for _, _, files in os.walk(tmp_path) for n in files if ".tmp-" in n or n.endswith(".commit")]
    assert leftovers == []


def test_a_link_to_a_regular_file_is_written_through(data, capsys, tmp_path):
    target = tmp_path / "real" / "p.idx"
    target.parent.mkdir()
    target.write_text("old")
    os.symlink(target, tmp_path / "p.idx")
    status, lines = cli(["proxy-subset", "--rec", data["rec"], "--ratio", "0.5", "--out", str(tmp_path / "p.idx")],
                        capsys)
    assert status == 0, lines
    assert os.path.islink(tmp_path / "p.idx") and target.read_text() == open(data["idx"]).read()


# ---- names as long as the filesystem allows ----

def test_outputs_with_names_as_long_as_allowed_are_written(data, capsys, tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = str(tmp_path / ("p" * (limit - 5) + ".idx"))  # its summary <stem>.json at the limit
    status, lines = cli(["proxy-subset", "--rec", data["rec"], "--ratio", "0.5", "--out", out], capsys)
    assert status == 0, lines
    assert open(out).read() == open(data["idx"]).read()
    # select's longest member, <stem>_nn_cosine.png, at the limit
    out = str(tmp_path / ("s" * (limit - len("_nn_cosine.png")) + ".idx"))
    status, lines = cli(["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", "0.6", "--out", out,
                         "--gallery-ids", "2"], capsys)
    assert status == 0, lines
    stem = os.path.splitext(out)[0]
    assert json.load(open(stem + ".json"))["kept"] == len(open(out).read().splitlines())
    assert os.path.getsize(stem + "_nn_cosine.png") > 0
    drop = str(tmp_path / ("k" * (limit - 5) + ".idx"))  # its summary <stem>.json at the limit
    status, lines = cli(["conflicts", "--features", data["feats"], "--rec", data["rec"], "--out",
                         str(tmp_path / "c.json"), "--drop", drop, "--threshold", "0.5"], capsys)
    assert status == 0, lines
    assert sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n or "commit" in n) == []


def test_a_member_name_longer_than_allowed_is_refused_before_any_work(data, capsys, tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = str(tmp_path / ("s" * (limit - 5) + ".idx"))  # legal, <stem>.json too, but <stem>_nn_cosine.png not
    status, lines = cli(["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", "0.6", "--out",
                         out], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert ("_nn_cosine.png" in lines[0] or "_retention.png" in lines[0]) and "--out" in lines[0] and str(limit) in lines[0], lines
    assert os.listdir(tmp_path) == []


# ---- errors named for the option that named the path ----

def test_outputs_of_one_run_sharing_a_file_are_not_called_inputs(data, capsys, tmp_path):
    # --drop c.idx writes c.json, which --out names too
    status, lines = cli(["conflicts", "--features", data["feats"], "--rec", data["rec"], "--out",
                         str(tmp_path / "c.json"), "--drop", str(tmp_path / "c.idx")], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "input" not in lines[0] and "--drop" in lines[0] and "c.json" in lines[0], lines


def test_a_spill_folder_that_fails_is_reported_against_tmp_dir(data, tmp_path):
    """Features larger than the memory this machine reports are regrouped in --tmp-dir; a write there
    that fails (here: the file size limit) names --tmp-dir, not --out."""
    spill = tmp_path / "spill"
    spill.mkdir()
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {ROOT!r})
        import plugins.face_nms.feature_stream as fs
        fs.available_memory = lambda: 4096  # a machine too small for these features: they are regrouped
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        from plugins.face_nms.__main__ import main
        main(["select", "--features", {data["feats"]!r}, "--rec", {data["rec"]!r}, "--method", "local",
              "--threshold", "0.5", "--device", "cpu", "--out", {str(tmp_path / "s.idx")!r}, "--tmp-dir", {str(spill)!r}])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "--tmp-dir" in line and str(spill) in line and "s.idx" not in line, line
    assert os.listdir(spill) == [] and not os.path.exists(tmp_path / "s.idx")


# ---- sets: a kill in a commit, and the readers after it ----

KILL_AT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, ROOT)
    calls = [0]
    real = os.replace
    def replace(a, b):
        calls[0] += 1
        if calls[0] == N:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    os.replace = replace
    from plugins.face_nms.__main__ import main
    main(ARGV)
""")


def _killed_at(n, argv):
    code = KILL_AT.replace("ROOT", repr(ROOT)).replace("N", str(n), 1).replace("ARGV", repr(argv))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).returncode


def _filter(rec, idx):
    from types import SimpleNamespace

    from plugins.face_nms.filter import face_nms_filter
    cfg = SimpleNamespace(rec=rec, dataset_filter="face_nms", face_nms=dict(index=idx))
    cfg.get = lambda k, d=None: getattr(cfg, k, d)
    return face_nms_filter(cfg, SimpleNamespace(imgidx=np.arange(3))).imgidx


@pytest.mark.parametrize("reader", ["filter", "gallery", "stats"])
def test_a_drop_index_killed_in_its_commit_is_finished_or_refused_by_its_readers(data, capsys, tmp_path, reader):
    d = str(tmp_path)
    con = ["conflicts", "--features", data["feats"], "--rec", data["rec"], "--threshold", "0.3", "--out",
           f"{d}/c.json", "--drop", f"{d}/k.idx"]
    old_argv, new_argv = con + ["--drop-mode", "faces"], con + ["--drop-mode", "identity"]
    assert main(new_argv) is not None
    new = (open(f"{d}/k.idx").read(), json.load(open(f"{d}/k.json"))["kept"])
    assert main(old_argv) is not None
    old = (open(f"{d}/k.idx").read(), json.load(open(f"{d}/k.json"))["kept"])
    assert new != old
    n = 1
    while True:
        assert main(old_argv) is not None
        # the next writer removed what the killed one left
        assert [x for x in os.listdir(d) if ".tmp-" in x or "commit" in x] == [], n
        rc = _killed_at(n, new_argv)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL
        if reader == "filter":
            try:
                keys = _filter(data["rec"], f"{d}/k.idx")
            except ValueError as exc:
                assert "\n" not in str(exc) and "k.idx" in str(exc), exc
                keys = None
        else:
            argv = ["stats", "--rec", data["rec"], "--index", f"{d}/k.idx"] if reader == "stats" else \
                ["gallery", "--rec", data["rec"], "--features", data["feats"], "--index", f"{d}/k.idx", "--out",
                 f"{d}/g.html", "--gallery-ids", "2"]
            status, lines = cli(argv, capsys)
            assert status in (0, 1), lines
            if status == 1:
                assert len(lines) == 1 and "k.idx" in lines[0], lines
        # whatever the reader did, the set on disk is whole: the old one or the new one
        now = (open(f"{d}/k.idx").read(), json.load(open(f"{d}/k.json"))["kept"])
        assert now in (old, new), n
        assert len(now[0].splitlines()) == now[1]
        if reader == "filter" and keys is not None:
            assert len(keys) == now[1]
        assert not os.path.exists(f"{d}/.face_nms.commit"), n  # finished (the readers here may write {d})
        n += 1
    assert n > 5  # the kill reached every rename of the commit (five members)


def test_proxy_subset_onto_a_selection_replaces_its_whole_set(data, capsys, tmp_path):
    out = str(tmp_path / "s.idx")
    status, lines = cli(["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", "0.6", "--out", out,
                         "--gallery-ids", "2"], capsys)
    assert status == 0, lines
    assert sorted(os.listdir(tmp_path)) == ["s.html", "s.idx", "s.json", "s_nn_cosine.png", "s_retention.png"]
    status, lines = cli(["proxy-subset", "--rec", data["rec"], "--ratio", "0.5", "--out", out], capsys)
    assert status == 0, lines
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["s.idx", "s.json"]
    assert json.load(open(tmp_path / "s.json"))["method"].startswith("proxy-subset")
    assert open(out).read() == open(data["idx"]).read()
    assert len(_filter(data["rec"], out)) == len(open(out).read().splitlines())


def test_a_report_named_as_the_summary_of_an_index_is_refused(data, capsys, tmp_path):
    status, _ = cli(["proxy-subset", "--rec", data["rec"], "--ratio", "0.5", "--out", str(tmp_path / "s.idx")], capsys)
    assert status == 0
    summary = open(tmp_path / "s.json").read()
    status, lines = cli(["conflicts", "--features", data["feats"], "--rec", data["rec"], "--out",
                         str(tmp_path / "s.json")], capsys)
    assert status == 2 and len(lines) == 1 and "s.idx" in lines[0] and "--out" in lines[0], lines
    assert open(tmp_path / "s.json").read() == summary


# ---- concurrent writers of one set ----

def test_two_selections_to_one_out_take_turns(data, tmp_path):
    """Two processes write one --out at once (each rename slowed, so that the commits overlap): both
    succeed, each line tells its own set, and the disk holds one whole set, the same one the last
    process to commit reports."""
    def solo(ratio):
        d = tmp_path / f"solo{ratio}"
        d.mkdir()
        r = run(["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", ratio, "--device", "cpu",
                 "--gallery-ids", "2", "--out", str(d / "s.idx")])
        assert r.returncode == 0, r.stderr
        return r.stdout.replace(str(d), "OUT"), open(d / "s.idx").read(), json.load(open(d / "s.json"))["kept"]

    sets = {ratio: solo(ratio) for ratio in ("0.4", "0.8")}
    shared = tmp_path / "shared"
    shared.mkdir()
    procs = {}
    for ratio in sets:
        procs[ratio] = subprocess.Popen(
            ["strace", "-f", "-ttt", "-qq", "-o", str(tmp_path / f"trace{ratio}"), "-e",
             "trace=rename,openat,unlink,flock", "-e", "inject=rename:delay_enter=400000",
             sys.executable, "-m", "plugins.face_nms", "select", "--features", data["feats"], "--rec", data["rec"],
             "--ratio", ratio, "--device", "cpu", "--gallery-ids", "2", "--out", str(shared / "s.idx")],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {ratio: p.communicate(timeout=300) + (p.returncode,) for ratio, p in procs.items()}
    for ratio, (out, err, rc) in results.items():
        assert rc == 0, err
        assert out.replace(str(shared), "OUT") == sets[ratio][0]
    on_disk = (open(shared / "s.idx").read(), json.load(open(shared / "s.json"))["kept"])
    winners = [r for r in sets if sets[r][1:] == on_disk]
    assert len(winners) == 1, on_disk[1]
    trace = {r: [(float(line.split()[1]), line) for line in open(tmp_path / f"trace{r}") if str(shared) in line]
             for r in sets}
    # the one whose rename onto s.idx came last (strace's timestamps)
    renamed = {r: max(t for t, line in trace[r] if f'"{shared}/s.idx") = 0' in line) for r in sets}
    assert winners == [max(renamed, key=renamed.get)], renamed
    # the two writes overlapped in time: without turns they would have raced
    spans = {r: (trace[r][0][0], trace[r][-1][0]) for r in sets}
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans
    leftovers = [n for n in os.listdir(shared) if ".tmp-" in n or n.endswith(".commit")]
    assert leftovers == []


def test_an_interrupted_commit_that_cannot_be_finished_is_refused_in_one_line(data, capsys, tmp_path):
    d = str(tmp_path / "sets")
    os.mkdir(d)
    con = ["conflicts", "--features", data["feats"], "--rec", data["rec"], "--threshold", "0.3", "--out",
           f"{d}/c.json", "--drop", f"{d}/k.idx"]
    assert main(con + ["--drop-mode", "faces"]) is not None
    before = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}
    assert _killed_at(2, con) == -signal.SIGKILL  # the journal written, the first rename not yet
    assert os.path.exists(f"{d}/.face_nms.commit")
    if subprocess.run(["chattr", "+i", d], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here: no folder refuses this process")
    try:
        status, lines = cli(["stats", "--rec", data["rec"], "--index", f"{d}/k.idx"], capsys)
    finally:
        subprocess.run(["chattr", "-i", d], check=True)
    assert status == 1 and len(lines) == 1, lines
    assert "k.idx" in lines[0] and ".face_nms.commit" in lines[0] and "interrupted" in lines[0], lines
    assert {n: open(os.path.join(d, n), "rb").read() for n in before} == before
    # a process that may write the folder finishes it
    status, lines = cli(["stats", "--rec", data["rec"], "--index", f"{d}/k.idx"], capsys)
    assert status == 0 and not os.path.exists(f"{d}/.face_nms.commit")
    assert json.load(open(f"{d}/k.json"))["mode"] == "identity"


def test_the_random_filter_index_is_not_written_over_a_fifo(data, tmp_path):
    from types import SimpleNamespace

    from plugins.face_nms.filter import random_filter
    os.mkfifo(tmp_path / "train_random_seed0.idx")
    cfg = SimpleNamespace(rec=data["rec"], dataset_filter="random", face_nms=dict(ratio=0.5), output=str(tmp_path))
    cfg.get = lambda k, d=None: getattr(cfg, k, d)
    with pytest.raises(ValueError, match="train_random_seed0.idx.*FIFO.*config.output"):
        random_filter(cfg, SimpleNamespace(imgidx=np.arange(3)))
    assert stat.S_ISFIFO(os.lstat(tmp_path / "train_random_seed0.idx").st_mode)
    os.remove(tmp_path / "train_random_seed0.idx")
    (tmp_path / "train_random_seed0.json").write_text("{}")  # the summary of an earlier index of that name
    ds = random_filter(cfg, SimpleNamespace(imgidx=np.arange(3)))
    assert len(ds.imgidx) == len(open(tmp_path / "train_random_seed0.idx").read().splitlines())
    assert sorted(os.listdir(tmp_path)) == ["train_random_seed0.idx"]


def test_a_journal_naming_files_elsewhere_is_not_followed(data, capsys, tmp_path):
    """A journal is acted on only where each folder it names holds it too: one planted in an
    output folder cannot rename or remove files in another."""
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "keep.json").write_text("mine")
    (victim / "keep.idx.tmp-1").write_text("planted")
    (victim / "keep.idx").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".face_nms.commit").write_text(f"{victim}/keep.idx.tmp-1\t{victim}/keep.idx\n\t{victim}/keep.json\n")
    status, lines = cli(["proxy-subset", "--rec", data["rec"], "--ratio", "0.5", "--out", str(out / "p.idx")], capsys)
    assert status == 0, lines
    assert (victim / "keep.json").read_text() == "mine" and (victim / "keep.idx").read_text() == "mine"
    (out / ".face_nms.commit").write_text(f"/etc/passwd.bak\t{out}/p.idx\n")  # not a temporary of p.idx
    status, lines = cli(["stats", "--rec", data["rec"], "--index", str(out / "p.idx")], capsys)
    assert status == 1 and len(lines) == 1 and ".face_nms.commit" in lines[0] and "remove it" in lines[0], lines


@pytest.fixture
def full_folder(tmp_path):
    """A folder on a 4 KiB tmpfs (one page: the second file of a set does not fit), or skip saying why."""
    d = tmp_path / "full"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): no folder to fill")
    try:
        yield str(d)
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_a_full_output_folder_is_reported_against_the_option_that_named_it(data, capsys, full_folder):
    for argv, option in (
            (["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", "0.6", "--out",
              f"{full_folder}/s.idx"], "--out"),
            (["conflicts", "--features", data["feats"], "--rec", data["rec"], "--out", f"{data['root']}/c.json",
              "--drop", f"{full_folder}/k.idx", "--threshold", "0.3"], "--drop")):
        status, lines = cli(argv, capsys)
        assert status == 1, lines
        line = lines[-1]
        assert f"{option} " in line and full_folder in line and "No space left" in line and ".tmp-" not in line, line
        assert os.listdir(full_folder) == []
