"""A selection's outputs appear together, and no temporary file outlives its run."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from plugins.face_nms.files import atomic_output, output_set
from plugins.face_nms.select import Selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _selection(n=50, kept=30, threshold=0.5):
    labels = np.repeat(np.arange(10), 5)
    sel = Selection(keep=np.arange(kept), threshold=threshold, total=n, nn_cos=np.full(kept, 0.3, np.float32))
    return sel, labels


def _write_in_child(tmp_path, kill_at_replace, threshold, page=False):
    """Writes a selection set in a child process that SIGKILLs itself at its n-th os.replace; with
    ``page``, a page holding the threshold joins the set."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import numpy as np
        from plugins.face_nms.report import write_selection
        from plugins.face_nms.select import Selection
        calls = [0]
        real = os.replace
        def replace(a, b):
            calls[0] += 1
            if calls[0] == {kill_at_replace}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(a, b)
        os.replace = replace
        def page(path, info, plots):
            open(path, "w").write(str(info["threshold"]))
        sel = Selection(keep=np.arange(20), threshold={threshold}, total=50, nn_cos=np.full(20, 0.3, np.float32))
        write_selection({str(tmp_path / "sel.idx")!r}, np.arange(20), np.arange(20) * 100, sel,
                        np.repeat(np.arange(10), 5), page={"page" if page else "None"})
    """)
    return subprocess.run([sys.executable, "-c", code]).returncode


def test_selection_set_is_old_or_new_after_a_kill_at_any_rename(tmp_path):
    from plugins.face_nms.report import write_selection
    names = ["sel.idx", "sel.json", "sel_retention.png", "sel_nn_cosine.png"]
    for kill_at in (1, 2, 3, 5, 6):  # the journal, the four renames, none
        for name in os.listdir(tmp_path):
            os.remove(tmp_path / name)
        sel, labels = _selection()
        write_selection(str(tmp_path / "sel.idx"), np.arange(30), np.arange(30) * 100, sel, labels)
        rc = _write_in_child(tmp_path, kill_at, 0.25)
        # the next writer (or reader) of that output finishes what the killed one committed
        from plugins.face_nms.files import finish_interrupted_set, remove_stale_temporaries
        finish_interrupted_set(str(tmp_path / "sel.idx"))
        for name in names:
            remove_stale_temporaries(str(tmp_path / name))
        assert sorted(os.listdir(tmp_path)) == sorted(names), (kill_at, os.listdir(tmp_path))
        lines = len(open(tmp_path / "sel.idx").read().splitlines())
        threshold = json.load(open(tmp_path / "sel.json"))["threshold"]
        new = (lines, threshold) == (20, 0.25)
        old = (lines, threshold) == (30, 0.5)
        assert new or old, (kill_at, lines, threshold)
        if rc == 0:
            assert new


def test_stale_temporary_of_a_killed_run_is_removed_on_next_start(tmp_path):
    target = tmp_path / "out.json"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)  # a process that has exited: its temporary is debris
    stale = tmp_path / f"out.json.tmp-{dead}"
    stale.write_text("partial")
    with atomic_output(str(target)) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_output_set_failure_keeps_the_old_set(tmp_path):
    paths = [str(tmp_path / n) for n in ("a.idx", "a.json")]
    for p in paths:
        open(p, "w").write("old")
    try:
        with output_set(paths) as tmps:
            open(tmps[0], "w").write("new")
            raise RuntimeError("plot failed")
    except RuntimeError:
        pass
    assert [open(p).read() for p in paths] == ["old", "old"]
    assert sorted(os.listdir(tmp_path)) == ["a.idx", "a.json"]


def test_sigint_during_the_renames_waits_even_with_other_threads(tmp_path):
    """A signal reaches any thread of the process; the renames must still finish as one step."""
    code = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        sys.path.insert(0, {ROOT!r})
        import numpy as np
        from plugins.face_nms.report import write_selection
        from plugins.face_nms.select import Selection
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # as torch's and tqdm's threads
        calls = [0]
        real = os.replace
        def replace(a, b):
            calls[0] += 1
            if calls[0] == 3:  # the journal and .idx renamed, .json not yet
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            return real(a, b)
        os.replace = replace
        sel = Selection(keep=np.arange(20), threshold=0.25, total=50, nn_cos=np.full(20, 0.3, np.float32))
        try:
            write_selection({str(tmp_path / "sel.idx")!r}, np.arange(20), np.arange(20) * 100, sel,
                            np.repeat(np.arange(10), 5))
        except KeyboardInterrupt:
            print("interrupted after", calls[0])
    """)
    from plugins.face_nms.report import write_selection
    sel, labels = _selection()
    write_selection(str(tmp_path / "sel.idx"), np.arange(30), np.arange(30) * 100, sel, labels)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith("interrupted after 5"), out  # the journal and all four renames done before the signal acted
    assert len(open(tmp_path / "sel.idx").read().splitlines()) == 20
    assert json.load(open(tmp_path / "sel.json"))["threshold"] == 0.25
    assert sorted(os.listdir(tmp_path)) == sorted(["sel.idx", "sel.json", "sel_retention.png", "sel_nn_cosine.png"])
