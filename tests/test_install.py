"""install.sh fails whole or succeeds whole: every failure leaves the host byte-identical, in one line.

The tests run as root, which ignores permission bits: files and folders are made unwritable with the
immutable attribute (chattr +i), a commit that fails half-way with the append-only attribute
(chattr +a: entries can be added, not replaced or removed), a full disk with a small tmpfs mounted in
a private mount namespace (unshare -m) and with a file size limit (ulimit -f).
"""
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from test_host import HOST_AT, ROOT, host, install, installed, pristine, tree  # noqa: F401 (fixtures)

MANIFEST = ".arcface-plugins-manifest"
OURS = sorted(os.listdir(os.path.join(ROOT, "configs")))


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def chattr(tmp_path):
    """chattr(flag, path): sets an attribute that binds root too; removed again at teardown."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip(f"chattr +i does not work on {tmp_path}'s filesystem: cannot make a file unwritable for root")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    done = []

    def set_flag(flag, path):
        subprocess.run(["chattr", "+" + flag, path], check=True)
        done.append((flag, path))

    yield set_flag
    for flag, path in reversed(done):
        subprocess.run(["chattr", "-" + flag, path], check=True)


def assert_failed_cleanly(r, name):
    """Non-zero exit, one line naming the file, nothing claimed."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0
    assert len(lines) == 1 and name in lines[0], r.stderr
    assert "installed" not in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["train_v2.py", "dataset.py"])
def test_an_unwritable_host_file_changes_nothing(host, chattr, name):
    root, at = host
    chattr("i", os.path.join(at, name))
    before = tree(at)
    r = install("--no-deps", root)
    assert_failed_cleanly(r, os.path.join(at, name))
    assert tree(at) == before


@pytest.mark.parametrize("folder", ["configs", "."])
def test_an_unwritable_folder_changes_nothing(host, chattr, folder):
    root, at = host
    path = os.path.normpath(os.path.join(at, folder))
    chattr("i", path)
    before = tree(at)
    r = install("--no-deps", root)
    assert_failed_cleanly(r, path)
    assert tree(at) == before


def make_upgrade(at):
    """An install whose first recipe is an older version and whose dataset.py is pristine again."""
    old = "# an older version of this recipe\n"
    with open(os.path.join(at, "configs", OURS[0]), "w") as f:
        f.write(old)
    lines = open(os.path.join(at, MANIFEST)).read().splitlines()
    lines = [f"config:{OURS[0]} {hashlib.sha256(old.encode()).hexdigest()}" if l.startswith(f"config:{OURS[0]}")
             else l for l in lines]
    with open(os.path.join(at, MANIFEST), "w") as f:
        f.write("\n".join(lines) + "\n")
    r = subprocess.run(["patch", "-s", "-R", os.path.join(at, "dataset.py"), os.path.join(ROOT, "patches", "dataset.py.patch")])
    assert r.returncode == 0


def test_a_failure_half_way_through_the_commit_is_rolled_back(installed, chattr):
    root, at = installed
    make_upgrade(at)
    chattr("a", os.path.join(at, "configs"))  # the new recipe cannot replace the old one
    before = tree(at)
    r = install("--no-deps", root)
    assert_failed_cleanly(r, os.path.join(at, "configs", OURS[0]))
    assert tree(at) == before


def test_an_upgrade_replaces_unedited_recipes(installed):
    root, at = installed
    make_upgrade(at)
    r = install("--no-deps", root)
    assert r.returncode == 0 and "installed into" in r.stdout, r.stderr
    assert sha(os.path.join(at, "configs", OURS[0])) == sha(os.path.join(ROOT, "configs", OURS[0]))
    assert f"config:{OURS[0]} {sha(os.path.join(ROOT, 'configs', OURS[0]))}" in open(os.path.join(at, MANIFEST)).read()


@pytest.mark.parametrize("what", ["configs", "train_v2.py"])
def test_a_failed_uninstall_changes_nothing(installed, chattr, what):
    root, at = installed
    chattr("a" if what == "configs" else "i", os.path.join(at, what))
    before = tree(at)
    r = install("--uninstall", root)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert os.path.join(at, what) in r.stderr and "uninstalled" not in r.stdout
    assert tree(at) == before


@pytest.mark.parametrize("broken", ["other content", "hunk fails"])
def test_a_patch_error_changes_nothing(host, tmp_path, broken):
    root, at = host
    repo = tmp_path / "repo"
    for d in ("configs", "patches"):
        shutil.copytree(os.path.join(ROOT, d), repo / d)
    shutil.copy(os.path.join(ROOT, "install.sh"), repo / "install.sh")
    os.symlink(os.path.join(ROOT, "plugins"), repo / "plugins")
    p = repo / "patches" / "dataset.py.patch"
    lines = p.read_text().splitlines(keepends=True)
    first_hunk = next(i for i, l in enumerate(lines) if l.startswith("@@"))
    if broken == "other content":  # applies, but gives a file host.sha256 does not know
        i = next(i for i, l in enumerate(lines) if l.startswith("+") and not l.startswith("+++") and l.strip() != "+")
        lines[i] = lines[i].rstrip("\n") + "  # changed\n"
    else:  # the first hunk's context is nowhere in the file
        lines[first_hunk + 1:first_hunk + 4] = [" nothing like this 1\n", " nothing like this 2\n", " nothing like this 3\n"]
    p.write_text("".join(lines))
    before = tree(at)
    r = install("--no-deps", root, repo=str(repo))
    assert_failed_cleanly(r, os.path.join(at, "dataset.py"))
    assert tree(at) == before


def test_an_install_interrupted_during_the_commit_is_rolled_back(host, tmp_path):
    """SIGTERM right after the third rename of the commit (manifest, dataset.py, train_v2.py)."""
    root, at = host
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mv").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/count
        {shutil.which("mv")} "$@"; rc=$?
        [ "$n" = 2 ] && kill -TERM "$INSTALL_PID"
        exit $rc
        """))
    (bin_dir / "mv").chmod(0o755)
    before = tree(at)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "-c", 'export INSTALL_PID=$$; exec bash "$0" --no-deps "$1"',
                        os.path.join(ROOT, "install.sh"), root], capture_output=True, text=True, env=env)
    assert r.returncode == 143 and "installed" not in r.stdout
    assert r.stderr.strip() == "install.sh: stopped before the end; the changes made so far were undone"
    assert int((tmp_path / "count").read_text()) > 3, "the commit had begun"
    assert tree(at) == before


def test_a_file_size_limit_changes_nothing(host):
    root, at = host
    before = tree(at)
    r = subprocess.run(["bash", "-c", 'ulimit -f 8 && exec bash "$0" --no-deps "$1"',
                        os.path.join(ROOT, "install.sh"), root], capture_output=True, text=True)
    assert_failed_cleanly(r, at)
    assert tree(at) == before


FULL_DISK = """
import hashlib, json, os, shutil, subprocess
mnt, pristine, script = MNT, PRISTINE, SCRIPT
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt], check=True)
results = []
for free in range(0, 24):
    at = os.path.join(mnt, "insightface", "recognition", "arcface_torch")
    shutil.copytree(pristine, at, symlinks=True)
    with open(os.path.join(mnt, "fill"), "wb") as f:  # fill the disk, then free `free` pages
        try:
            while True:
                f.write(b"\\0" * 65536); f.flush()
        except OSError:
            pass
    os.truncate(os.path.join(mnt, "fill"), max(0, os.path.getsize(os.path.join(mnt, "fill")) - free * 4096))
    before = tree(at)
    r = subprocess.run(["bash", script, "--no-deps", os.path.join(mnt, "insightface")], capture_output=True, text=True)
    results.append({"free": free, "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                    "same": tree(at) == before, "after": tree(at)})
    shutil.rmtree(os.path.join(mnt, "insightface")); os.remove(os.path.join(mnt, "fill"))
print(json.dumps(results))
"""


def test_a_full_disk_changes_nothing(pristine, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = (f"MNT, PRISTINE, SCRIPT = {str(mnt)!r}, {pristine!r}, {os.path.join(ROOT, 'install.sh')!r}\n"
            + inspect.getsource(tree) + FULL_DISK)
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0 and ("unshare" in r.stderr or "mount" in r.stderr) and "Traceback" not in r.stderr:
        pytest.skip(f"cannot mount a small tmpfs in a private mount namespace: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout)
    failed = [x for x in results if x["rc"] != 0]
    assert failed and len(failed) < len(results), "some runs hit the full disk, the last ones had room"
    for x in failed:
        assert x["same"], x
        lines = x["stderr"].strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "installed" not in x["stdout"], x
    for x in results:
        if x["rc"] == 0:
            assert "installed into" in x["stdout"] and "plugins" in x["after"] and MANIFEST in x["after"], x


def test_an_edited_recipe_is_kept_by_uninstall_and_refused_by_reinstall(installed):
    root, at = installed
    edited = os.path.join(at, "configs", OURS[1])
    with open(edited, "a") as f:
        f.write("config.lr = 0.01  # my change\n")
    content = open(edited).read()
    before = tree(at)
    r = install("--no-deps", root)
    assert_failed_cleanly(r, edited)
    assert tree(at) == before
    r = install("--uninstall", root)
    assert r.returncode == 0 and "uninstalled" in r.stdout, r.stderr
    assert [l for l in r.stdout.splitlines() if edited in l and "kept" in l]
    assert open(edited).read() == content
    left = {c for c in OURS if os.path.exists(os.path.join(at, "configs", c))}
    assert left == {OURS[1]} and not os.path.lexists(os.path.join(at, "plugins"))
    assert not os.path.exists(os.path.join(at, MANIFEST))


def test_a_manifest_of_names_only_still_uninstalls(installed, pristine):
    root, at = installed
    with open(os.path.join(at, MANIFEST), "w") as f:
        f.write("link:plugins\n" + "".join(f"config:{c}\n" for c in OURS))
    edited = os.path.join(at, "configs", OURS[2])
    with open(edited, "a") as f:
        f.write("# mine\n")
    r = install("--uninstall", root)
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stdout.splitlines() if edited in l and "kept" in l]
    want = tree(pristine)
    want[f"configs/{OURS[2]}"] = sha(edited)
    assert tree(at) == want


def test_a_stage_left_by_a_killed_run_is_removed(host):
    root, at = host
    stale = os.path.join(at, ".arcface-plugins-stage.999999999.abcdef")
    os.makedirs(stale)
    open(os.path.join(stale, "train_v2.py.patched"), "w").close()
    r = install("--no-deps", root)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(stale)
    assert not [n for n in os.listdir(at) if n.startswith(".arcface-plugins-stage")]
