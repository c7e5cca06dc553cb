"""install.sh's dependency step refuses an interpreter it has no constraint set for, in one line."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deps_only(python):
    return subprocess.run(["bash", os.path.join(ROOT, "install.sh"), "--deps-only"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": python})


def test_an_interpreter_that_does_not_run_is_named():
    r = deps_only("/nonexistent/python3")
    assert r.returncode == 1
    assert r.stderr.strip() == ("install.sh: cannot run '/nonexistent/python3': set PYTHON to a Python 3.10 to 3.13 "
                                "interpreter")


def python39():
    for exe in (shutil.which("python3.9"), os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3.9")):
        if exe and subprocess.run([exe, "-c", ""], capture_output=True).returncode == 0:
            return exe
    return None


def test_an_unsupported_python_is_refused_naming_the_supported_ones():
    exe = python39()
    if not exe:
        pytest.skip("no Python 3.9 on this machine to be refused")
    r = deps_only(exe)
    assert r.returncode == 1
    assert r.stderr.strip() == ("install.sh: Python 3.9 is not supported: there is no constraints/py3.9.txt; use "
                                "Python 3.10, 3.11, 3.12 or 3.13 (e.g. PYTHON=python3.13 ./install.sh ...)")
