"""install.sh fails whole or succeeds whole: every failure leaves the host byte-identical, in one line.

The tests run as root, which ignores permission bits: files and folders are made unwritable with the
immutable attribute (chattr +i), a commit that fails half-way with the append-only attribute
(chattr +a: entries can be added, not replaced or removed), a full disk with a small tmpfs mounted in
a private mount namespace (unshare -m) and with a file size limit (ulimit -f).
"""
import collections
import hashlib
import inspect
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

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


# Interruptions, concurrent runs and lost bookkeeping. The host is compared with the two states an
# install or an uninstall may leave: exactly pristine or exactly installed (sha256 of every file).

INSTALL = os.path.join(ROOT, "install.sh")
LOCK = ".arcface-plugins-lock"
STAGE = ".arcface-plugins-stage"
SIGNAL_RUNS = int(os.environ.get("INSTALL_SIGNAL_RUNS", "30"))


@pytest.fixture(scope="session")
def installed_copy(pristine, tmp_path_factory):
    """An installed copy of arcface_torch, made once; the runs below copy it again."""
    root = tmp_path_factory.mktemp("installed")
    shutil.copytree(pristine, root / "recognition" / "arcface_torch", symlinks=True)
    r = install("--no-deps", str(root))
    assert r.returncode == 0, r.stderr
    return str(root / "recognition" / "arcface_torch")


@pytest.fixture(scope="session")
def installed_tree(installed_copy):
    return tree(installed_copy)


def leftovers(at):
    """The stage folders and lock file install.sh left in arcface_torch."""
    return sorted(n for n in os.listdir(at) if n.startswith(STAGE) or n == LOCK)


def fresh(src_at, base, i):
    root = os.path.join(base, f"run{i}")
    at = os.path.join(root, "recognition", "arcface_torch")
    shutil.copytree(src_at, at, symlinks=True)
    return root, at


def start(mode, root, env=None):
    args = ["--no-deps", root] if mode == "install" else ["--uninstall", root]
    return subprocess.Popen(["bash", "-c", 'export INSTALL_PID=$$; exec bash "$0" "$@"', INSTALL, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def committing(at):
    return any(os.path.exists(os.path.join(at, n, "journal")) for n in os.listdir(at) if n.startswith(STAGE))


def until_commit(p, at, t0, begun=False):
    """Seconds from t0 to the moment the run's journal appears (its commit begins; with begun: disappears,
    the commit is whole), None if the run ends first."""
    while p.poll() is None:
        if committing(at) != begun:
            return time.monotonic() - t0
        time.sleep(0.0005)
    return None


def timings(pristine, installed_copy, base):
    """{mode: (seconds to the commit, seconds of the commit)} of undisturbed runs here, the longest of 3."""
    out = {}
    for mode, src in (("install", pristine), ("uninstall", installed_copy)):
        runs = []
        for k in range(3):
            root, at = fresh(src, base, f"timing-{mode}-{k}")
            t0 = time.monotonic()
            p = start(mode, root)
            t = until_commit(p, at, t0)
            t2 = until_commit(p, at, t0, begun=True)
            p.communicate()
            assert p.returncode == 0 and t is not None
            runs.append((t, (t2 or time.monotonic() - t0) - t))
            shutil.rmtree(root)
        out[mode] = tuple(max(r[i] for r in runs) for i in (0, 1))
    return out


def at_random(p, at, took, rng):
    """Returns at a random moment of run p: a third of them anywhere in the run, the rest in its commit."""
    to_commit, commit = took
    t0 = time.monotonic()
    if rng.random() < 1 / 3:
        time.sleep(rng.uniform(0, (to_commit + commit) * 1.1))
    elif until_commit(p, at, t0) is not None:
        time.sleep(rng.uniform(0, commit * 1.2))


def test_a_signal_at_any_moment_leaves_the_host_pristine_or_installed(pristine, installed_copy, installed_tree,
                                                                         tmp_path):
    """SIGTERM / SIGINT / SIGHUP at random moments of installs and uninstalls, often a second and third
    one during the rollback; a third of them to the whole process group, as a Ctrl-C does (the tools
    running get it too)."""
    rng = random.Random(int(os.environ.get("INSTALL_SIGNAL_SEED", "0")))
    took = timings(pristine, installed_copy, str(tmp_path))
    want = {"pristine": tree(pristine), "installed": installed_tree}
    outcomes = collections.Counter()
    for i in range(SIGNAL_RUNS):
        mode = ("install", "uninstall")[i % 2]
        before, after = ("pristine", "installed") if mode == "install" else ("installed", "pristine")
        root, at = fresh(pristine if mode == "install" else installed_copy, str(tmp_path), i)
        sig = rng.choice([signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
        group = rng.random() < 1 / 3
        p = start(mode, root)
        at_random(p, at, took[mode], rng)
        for _ in range(rng.choice([1, 1, 2, 3])):
            try:
                os.killpg(p.pid, sig) if group else p.send_signal(sig)
            except ProcessLookupError:
                break
            time.sleep(rng.uniform(0, 0.01))
        out, err = p.communicate(timeout=120)
        state = next((s for s, t in want.items() if tree(at) == t), "neither")
        case = dict(run=i, mode=mode, signal=sig.name, group=group, rc=p.returncode, stdout=out, stderr=err, state=state)
        assert state in (before, after) and not leftovers(at), (case, leftovers(at))
        # bash 5.2 itself, signalled while it parses a $(...), may fail to parse the trap: the host is
        # still exact, the run ends with status 2 and bash's own line before ours
        bash_parse = p.returncode == 2 and "trap: line 2: unexpected EOF while looking for matching" in err
        if bash_parse:
            err = "".join(l for l in err.splitlines(keepends=True) if "trap: line 2: unexpected EOF" not in l)
        assert len(err.strip().splitlines()) <= 1 and "line " not in err, case
        assert (p.returncode == 0) == (state == after), case
        if "undone" in err:
            assert state == before and err.strip() == "install.sh: stopped before the end; the changes made so far were undone", case
        outcomes[(mode, state, "undone" if "undone" in err else "bash parse error" if bash_parse else "")] += 1
        shutil.rmtree(root)
    print(f"{SIGNAL_RUNS} runs:", dict(outcomes))
    assert sum(n for k, n in outcomes.items() if k[2] == "undone") > 0, "some signals came during the commit"


def test_a_kill_at_any_moment_is_repaired_by_the_next_run(pristine, installed_copy, installed_tree, tmp_path):
    """SIGKILL at random moments; the next run, install or uninstall, finds the host as it must leave it."""
    rng = random.Random(int(os.environ.get("INSTALL_SIGNAL_SEED", "0")) + 1)
    took = timings(pristine, installed_copy, str(tmp_path))
    want = {"pristine": tree(pristine), "installed": installed_tree}
    outcomes = collections.Counter()
    for i in range(SIGNAL_RUNS):
        mode = ("install", "uninstall")[i % 2]
        root, at = fresh(pristine if mode == "install" else installed_copy, str(tmp_path), i)
        p = start(mode, root)
        at_random(p, at, took[mode], rng)
        p.kill()
        p.communicate(timeout=120)
        left = "stage" if [n for n in leftovers(at) if n.startswith(STAGE)] else "no stage"
        then = rng.choice(["install", "uninstall"])
        p2 = start(then, root)
        out, err = p2.communicate(timeout=120)
        case = dict(run=i, killed=mode, then=then, rc=p2.returncode, stdout=out, stderr=err)
        assert p2.returncode == 0 and err == "", case
        assert tree(at) == want["installed" if then == "install" else "pristine"], case
        assert not leftovers(at), (case, leftovers(at))
        outcomes[(mode, then, left, "undid" if "undid" in out else "")] += 1
        shutil.rmtree(root)
    print(f"{SIGNAL_RUNS} runs:", dict(outcomes))
    assert sum(n for k, n in outcomes.items() if k[3]) > 0, "some kills came during the commit"


def gated_mv(tmp_path, after):
    """A PATH with an mv that, from its `after`-th call on, announces itself and waits for tmp_path/open."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mv").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/count
        if [ "$n" -ge {after} ]; then
          touch {tmp_path}/waiting
          while [ ! -e {tmp_path}/open ]; do sleep 0.02; done
        fi
        exec {shutil.which("mv")} "$@"
        """))
    (bin_dir / "mv").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def wait_for(path, timeout=30):
    t = time.monotonic()
    while not os.path.exists(path):
        assert time.monotonic() - t < timeout, f"{path} did not appear"
        time.sleep(0.01)


def test_a_second_run_refuses_while_the_first_holds_the_lock(host, tmp_path):
    root, at = host
    first = start("install", root, env=gated_mv(tmp_path, 2))  # held inside its commit
    wait_for(tmp_path / "waiting")
    during = tree(at)
    second = subprocess.run(["bash", INSTALL, "--no-deps", root], capture_output=True, text=True,
                            env=dict(os.environ, INSTALL_LOCK_WAIT="1"))
    assert_failed_cleanly(second, os.path.join(at, LOCK))
    assert "wait" in second.stderr and "run again" in second.stderr
    assert tree(at) == during, "the second run touched nothing, the first one's stage included"
    (tmp_path / "open").touch()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0 and "installed into" in out, err
    assert not leftovers(at)


def test_two_installs_at_once_one_interrupted_leave_the_host_installed(host, installed_tree, tmp_path):
    """The second install waits for the lock; the first, stopped in its commit, undoes only its own changes."""
    root, at = host
    first = start("install", root, env=gated_mv(tmp_path, 2))
    wait_for(tmp_path / "waiting")
    second = start("install", root)
    time.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    (tmp_path / "open").touch()
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 143 and "undone" in err1, (out1, err1)
    assert second.returncode == 0 and "installed into" in out2, (out2, err2)
    assert tree(at) == installed_tree and not leftovers(at)


@pytest.mark.parametrize("then", ["install", "uninstall"])
def test_a_lost_manifest_is_recovered_from_the_files_contents(installed, pristine, installed_tree, then):
    root, at = installed
    os.remove(os.path.join(at, MANIFEST))
    r = install("--no-deps", root) if then == "install" else install("--uninstall", root)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert tree(at) == (installed_tree if then == "install" else tree(pristine))


def test_a_file_with_a_recipes_name_and_no_manifest_is_not_called_a_host_file(installed):
    root, at = installed
    os.remove(os.path.join(at, MANIFEST))
    edited = os.path.join(at, "configs", OURS[0])
    with open(edited, "a") as f:
        f.write("config.lr = 0.01  # my change\n")
    before = tree(at)
    r = install("--no-deps", root)
    assert_failed_cleanly(r, edited)
    assert "host file" not in r.stderr and "move it away" in r.stderr
    assert tree(at) == before
    r = install("--uninstall", root)
    assert r.returncode == 0 and "uninstalled" in r.stdout, r.stderr
    kept = [l for l in r.stdout.splitlines() if edited in l]
    assert len(kept) == 1 and "kept" in kept[0] and "host file" not in kept[0]
    assert {c for c in OURS if os.path.exists(os.path.join(at, "configs", c))} == {OURS[0]}


def killed_by(tmp_path, tool, after):
    """A PATH whose `tool` SIGKILLs the install.sh that runs it at its `after`-th call, after doing its work."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / tool).write_text(textwrap.dedent(f"""\
        #!/bin/bash
        n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/count
        {shutil.which(tool)} "$@"; rc=$?
        [ "$n" = {after} ] && kill -KILL "$INSTALL_PID"
        exit $rc
        """))
    (bin_dir / tool).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize("tool,after", [("cp", 1), ("mv", 3)])
@pytest.mark.parametrize("then", ["install", "uninstall"])
def test_a_stage_of_a_killed_install_is_removed_by_the_next_run(host, pristine, installed_tree, tmp_path, tool, after, then):
    """SIGKILL while staging (cp) or half-way through the commit (mv); the next run of either mode repairs."""
    root, at = host
    p = start("install", root, env=killed_by(tmp_path, tool, after))
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert [n for n in os.listdir(at) if n.startswith(STAGE)], "the killed run left its stage"
    r = install("--no-deps", root) if then == "install" else install("--uninstall", root)
    assert r.returncode == 0 and r.stderr == "", (r.stdout, r.stderr)
    assert tree(at) == (installed_tree if then == "install" else tree(pristine))
    assert not leftovers(at)


def test_a_repair_that_cannot_put_a_file_back_names_it_and_the_next_run_finishes(host, pristine, chattr, tmp_path):
    root, at = host
    p = start("install", root, env=killed_by(tmp_path, "mv", 3))  # the journal, the manifest, two patched files
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    target = os.path.join(at, "dataset.py")
    chattr("i", target)
    r = install("--uninstall", root)
    assert_failed_cleanly(r, target)
    assert "run again" in r.stderr
    assert [n for n in os.listdir(at) if n.startswith(STAGE)], "the unfinished changes are still recorded"
    subprocess.run(["chattr", "-i", target], check=True)
    r = install("--uninstall", root)
    assert r.returncode == 0 and r.stderr == "" and "undid" in r.stdout, (r.stdout, r.stderr)
    assert tree(at) == tree(pristine) and not leftovers(at)


def test_a_bad_lock_wait_is_refused_in_one_line(host):
    root, at = host
    before = tree(at)
    r = subprocess.run(["bash", INSTALL, "--no-deps", root], capture_output=True, text=True,
                       env=dict(os.environ, INSTALL_LOCK_WAIT="1x"))
    assert_failed_cleanly(r, "INSTALL_LOCK_WAIT=1x")
    assert tree(at) == before and not leftovers(at)


def test_run_through_a_link_from_another_folder_into_a_path_with_spaces(pristine, installed_tree, tmp_path):
    at = tmp_path / "my hosts" / "insight face" / "recognition" / "arcface_torch"
    shutil.copytree(pristine, at, symlinks=True)
    (tmp_path / "bin dir").mkdir()
    link = tmp_path / "bin dir" / "install-arcface-plugins"
    os.symlink(os.path.join(ROOT, "install.sh"), link)
    run = lambda *args: subprocess.run(["bash", str(link), *args], capture_output=True, text=True, cwd=str(tmp_path))
    r = run("--no-deps", str(tmp_path / "my hosts" / "insight face"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert tree(str(at)) == installed_tree
    r = run("--uninstall", str(tmp_path / "my hosts" / "insight face"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert tree(str(at)) == tree(pristine)


def test_an_install_from_a_moved_project_says_to_uninstall_first(host, tmp_path):
    moved = tmp_path / "project"
    moved.mkdir()
    subprocess.run(f"git ls-files -z | xargs -0 cp --parents -t {moved}", shell=True, check=True, cwd=ROOT)
    r = install("--no-deps", host[0], repo=str(moved))
    assert r.returncode == 0, r.stderr
    os.rename(moved, tmp_path / "project moved")
    before = tree(host[1])
    r = install("--no-deps", host[0])
    assert_failed_cleanly(r, f"{host[1]}/plugins")
    assert "--uninstall" in r.stderr and str(moved) in r.stderr and tree(host[1]) == before
    r = install("--uninstall", host[0])
    assert r.returncode == 0, r.stderr
    r = install("--no-deps", host[0])
    assert r.returncode == 0, r.stderr
