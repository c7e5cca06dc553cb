"""mxnet-compat-hook: plugins/compat.py's steps on every `import mxnet` of the environment install.sh makes."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    HOOK = importlib.metadata.distribution("mxnet-compat-hook")
except importlib.metadata.PackageNotFoundError:
    HOOK = None
needs_hook = pytest.mark.skipif(HOOK is None, reason="mxnet-compat-hook is not installed in this environment "
                                "(./install.sh --deps-only installs it)")


def python(code, executable=sys.executable):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run([executable, "-c", code], cwd="/", capture_output=True, text=True, env=env, timeout=300)


@needs_hook
def test_import_mxnet_alone_runs_compat():
    r = python("import mxnet; mxnet.recordio\n"
               "h, s = mxnet.recordio.unpack(mxnet.recordio.pack(mxnet.recordio.IRHeader(0, [3, 5], 4, 0), b'abc'))\n"
               "print(h.flag, h.label.tolist(), h.id, s)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "2 [3.0, 5.0] 4 b'abc'"


@needs_hook
def test_start_up_imports_the_hook_and_not_numpy():
    r = python("import sys\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'mxnet', 'mxnet_compat_hook')),"
               " type(sys.meta_path[0]).__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['mxnet_compat_hook'] MxnetFinder"


@needs_hook
def test_the_installed_compat_is_this_checkout_s():
    installed = HOOK.locate_file(os.path.join("mxnet_compat_hook", "compat.py"))
    with open(installed, "rb") as a, open(os.path.join(ROOT, "plugins", "compat.py"), "rb") as b:
        assert a.read() == b.read(), f"{installed} is older than plugins/compat.py: run ./install.sh --deps-only"


def site_listing(venv):
    purelib = sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv})
    return purelib, sorted(os.path.relpath(os.path.join(d, f), purelib)
                           for d, dirs, files in os.walk(purelib) for f in files + dirs)


def test_pip_uninstall_and_install_sh_uninstall_leave_nothing(tmp_path):
    build = tmp_path / "build"  # the layout install.sh builds from
    shutil.copytree(os.path.join(ROOT, "mxnet_hook"), build / "mxnet_hook",
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    (build / "plugins").mkdir()
    shutil.copy(os.path.join(ROOT, "plugins", "compat.py"), build / "plugins")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        str(build / "mxnet_hook"), "-w", str(tmp_path / "wheels")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").iterdir()
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    vpy = os.path.join(venv, "bin", "python")
    purelib, before = site_listing(venv)
    finder = "import sys; print(any(type(f).__name__ == 'MxnetFinder' for f in sys.meta_path))"
    for remove in (["bash", "-c", '"$PYTHON" -m pip uninstall -y -q mxnet-compat-hook'],
                   ["bash", os.path.join(ROOT, "install.sh"), "--uninstall", "--deps-only"]):
        r = subprocess.run([vpy, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert os.path.isfile(os.path.join(purelib, "mxnet_compat_hook.pth"))
        assert python(finder, vpy).stdout.strip() == "True"
        r = subprocess.run(remove, capture_output=True, text=True, env={**os.environ, "PYTHON": vpy})
        assert r.returncode == 0, r.stderr[-3000:]
        assert site_listing(venv)[1] == before
        assert python(finder, vpy).stdout.strip() == "False"
    assert r.stdout.strip() == f"install.sh: removed mxnet-compat-hook from {venv}"
    r = subprocess.run(remove, capture_output=True, text=True, env={**os.environ, "PYTHON": vpy})
    assert (r.returncode, r.stdout.strip()) == (0, f"install.sh: mxnet-compat-hook is not installed for {vpy}; "
                                                   "nothing to do")
