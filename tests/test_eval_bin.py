"""Reading evaluation .bin files: everything the host's load_bin reads, nothing that runs code."""
import glob
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from plugins.face_nms.eval_bin import read_bin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JPEG = bytes.fromhex("ffd8ffe000104a464946") + b"\x00" * 20  # bytes only: reading does not decode


# ---- what the host reads ----

def _numpy2(data):
    """The same pickle as numpy 2 writes it: its helpers live in numpy._core."""
    out = data
    for old in (b"numpy.core.multiarray", b"numpy.core.numeric"):
        new = old.replace(b"numpy.core", b"numpy._core")
        # protocol 4/5: SHORT_BINUNICODE (0x8c, length byte); 0-3: GLOBAL, newline-terminated text
        out = out.replace(b"\x8c" + bytes([len(old)]) + old, b"\x8c" + bytes([len(new)]) + new)
        out = out.replace(b"c" + old + b"\n", b"c" + new + b"\n")
    return out


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "uint8 array", "cv2 Nx1 array", "numpy 2"])
def test_python3_pickles_of_every_image_type_are_read(tmp_path, protocol, kind):
    raw = [JPEG + bytes([i]) for i in range(4)]
    bins = {"bytes": raw, "bytearray": [bytearray(b) for b in raw],
            "uint8 array": [np.frombuffer(b, np.uint8) for b in raw],
            "cv2 Nx1 array": [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in raw],
            "numpy 2": [np.frombuffer(b, np.uint8) for b in raw]}[kind]
    issame = [True, np.bool_(False)] if protocol % 2 else np.array([True, False])
    data = pickle.dumps((bins, issame), protocol=protocol)
    if kind == "numpy 2":
        data = _numpy2(data)
        assert b"numpy.core" not in data and b"numpy._core" in data
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    b = read_bin(str(path))
    assert [bytes(np.asarray(x).tobytes()) for x in b.bins] == raw
    assert b.issame.tolist() == [True, False]


def _python2():
    found = shutil.which("python2.7") or shutil.which("python2")
    if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
        return found
    found = sorted(glob.glob("/root/.pyenv/versions/2.7*/bin/python")) + \
        sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python")))
    return found[0] if found else None


PY2_WRITER = textwrap.dedent(r'''
    # Python 2's pickler writing what numpy 1.x on Python 2 reduces arrays and dtypes to
    import cPickle, sys, types
    np = types.ModuleType("numpy"); core = types.ModuleType("numpy.core")
    ma = types.ModuleType("numpy.core.multiarray")
    sys.modules.update({"numpy": np, "numpy.core": core, "numpy.core.multiarray": ma})
    def _reconstruct(*a): pass
    _reconstruct.__module__ = "numpy.core.multiarray"; ma._reconstruct = _reconstruct
    class ndarray(object):
        def __init__(self, raw): self.raw = raw
        def __reduce__(self):
            return (_reconstruct, (ndarray, (0,), "b"), (1, (len(self.raw),), dtype(), False, self.raw))
    class dtype(object):
        def __reduce__(self): return (dtype, ("u1", 0, 1), (3, "|", None, None, None, -1, -1, 0))
    ndarray.__module__ = dtype.__module__ = "numpy"; np.ndarray, np.dtype = ndarray, dtype
    raw = ["\xff\xd8\xff\xe0 jpeg %d \x80\x81" % i for i in range(6)]
    bins = raw[:2] + [bytearray(raw[2]), bytearray(raw[3])] + [ndarray(r) for r in raw[4:]]
    for protocol in (0, 1, 2):
        with open(sys.argv[1] + "/py2-%d.bin" % protocol, "wb") as f:
            cPickle.dump((bins, [True, False, True]), f, protocol)
''')


def test_python2_pickles_are_read_as_the_host_reads_them(tmp_path):
    """insightface's .bin files were written by Python 2: str images, bytearrays and numpy arrays."""
    py2 = _python2()
    if py2 is None:
        pytest.skip("no Python 2.7 interpreter found to write Python 2 pickles")
    subprocess.run([py2, "-c", PY2_WRITER, str(tmp_path)], check=True)
    raw = [b"\xff\xd8\xff\xe0 jpeg %d \x80\x81" % i for i in range(6)]
    for protocol in (0, 1, 2):
        b = read_bin(str(tmp_path / f"py2-{protocol}.bin"))
        assert [bytes(np.asarray(x).tobytes()) for x in b.bins] == raw, protocol
        assert [type(x) for x in b.bins[:5]] == [bytes, bytes, bytearray, bytearray, np.ndarray]
        assert b.issame.tolist() == [True, False, True]


# ---- what it refuses, unrun ----

HOSTILE = [
    ("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("subprocess", "check_output"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("builtins", "open"), ("__builtin__", "eval"), ("copyreg", "_reconstructor"), ("pickle", "loads"),
    ("runpy", "run_module"), ("importlib", "import_module"), ("ctypes", "CDLL"), ("numpy.ctypeslib", "load_library"),
    # numpy submodules under the names numpy's pickles use: importing them runs code (f2py's __main__ runs
    # f2py on this program's command line)
    ("numpy.f2py.__main__", "dtype"), ("numpy.f2py", "_reconstruct"), ("numpy.testing", "scalar"),
    ("numpy.distutils.core", "ndarray"), ("numpy.distutils", "_frombuffer"), ("numpy", "load"),
    ("numpy", "ndarray.__reduce__"), ("numpy.core.multiarray", "_reconstruct.__globals__"),
]


def _text(s, protocol):
    b = s.encode()
    return b"V" + b + b"\n" if protocol == 0 else b"X" + len(b).to_bytes(4, "little") + b


def _global(module, name, protocol):
    if protocol >= 4:
        return _text(module, 1) + _text(name, 1) + b"\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _head(protocol):
    return bytes([0x80, protocol]) if protocol >= 2 else b""


def _wrap(body, protocol):
    """(( [body, b''], [True] )): the payload as an image of a .bin."""
    empty = b"C\x00" if protocol >= 3 else b"(t"  # any second image
    true = b"\x88" if protocol >= 2 else b"I01\n"
    return _head(protocol) + b"((" + body + empty + b"l(" + true + b"lt."


def payloads(sentinel):
    """(label, global named in the refusal, pickle bytes) of each hostile .bin."""
    cmd = f"touch {sentinel}"
    out = []
    for module, name in HOSTILE:
        for p in range(6):
            g = _global(module, name, p)
            out.append((f"REDUCE {module}.{name} p{p}", f"{module}.{name}",
                        _head(p) + g + b"(" + _text(cmd, p) + b"tR."))
            out.append((f"nested {module}.{name} p{p}", f"{module}.{name}",
                        _wrap(g + b"(" + _text(cmd, p) + b"tR", p)))
            out.append((f"INST {module}.{name} p{p}", f"{module}.{name}",
                            _head(p) + b"(" + _text(cmd, p) + b"i" + module.encode() + b"\n" + name.encode() +
                            b"\n."))
            out.append((f"OBJ {module}.{name} p{p}", f"{module}.{name}",
                            _head(p) + b"(" + g + _text(cmd, p) + b"o."))
            if p >= 2:
                out.append((f"NEWOBJ {module}.{name} p{p}", f"{module}.{name}",
                            _head(p) + g + b"(" + _text(cmd, p) + b"t\x81."))
            if p >= 4:
                out.append((f"NEWOBJ_EX {module}.{name} p{p}", f"{module}.{name}",
                            _head(p) + g + b"(" + _text(cmd, p) + b"t}\x92."))
    for p in range(6):
        # an admitted reduction whose arguments, or BUILD state, hold a hostile one
        evil = _global("os", "system", p) + b"(" + _text(cmd, p) + b"tR"
        out.append((f"_reconstruct of os.system p{p}", "os.system",
                    _head(p) + _global("numpy.core.multiarray", "_reconstruct", p) + b"(" + evil + b"tR."))
        out.append((f"dtype BUILD os.system p{p}", "os.system",
                    _head(p) + _global("numpy", "dtype", p) + b"(" + _text("u1", p) + b"tR" + evil + b"b."))
        # admitted callables asked to do what no .bin does: a codec looked up (imported) by name, a huge buffer
        out.append((f"_codecs rot13 p{p}", "_codecs.encode with str, 'rot13'",
                    _head(p) + _global("_codecs", "encode", p) + b"(" + _text("flfgrz", p) + _text("rot13", p) +
                    b"tR."))
        out.append((f"bytearray size p{p}", "bytearray with (int)",
                    _head(p) + _global("builtins", "bytearray", p) + b"("
                    + (b"J\x00\x00\x00\x40" if p else b"I1073741824\n") + b"tR."))
        out.append((f"_reconstruct size p{p}", "_reconstruct with ndarray, shape (1099511627776,)",
                    _head(p) + _global("numpy.core.multiarray", "_reconstruct", p) + b"(" +
                    _global("numpy", "ndarray", p) + b"(" + (b"I1099511627776\n" if p == 0 else
                                                            b"\x8a\x06\x00\x00\x00\x00\x00\x01") +
                    b"t" + _text("b", p) + b"tR."))
        out.append((f"ndarray size p{p}", "numpy.ndarray with (tuple, str)",
                    _head(p) + _global("numpy", "ndarray", p) + b"((" + (b"I8589934592\n" if p == 0 else
                                                                         b"\x8a\x05\x00\x00\x00\x00\x02") +
                    b"t" + _text("uint8", p) + b"tR."))
        out.append((f"nested ndarray size p{p}", "numpy.ndarray with (tuple, str)",
                    _wrap(_global("numpy", "ndarray", p) + b"((" + (b"I8589934592\n" if p == 0 else
                                                                    b"\x8a\x05\x00\x00\x00\x00\x02") +
                          b"t" + _text("uint8", p) + b"tR", p)))
    for p in (4, 5):
        # STACK_GLOBAL with computed names: from the memo, and from a reduction
        memo = _head(p) + _text("os", 1) + b"\x94" + _text("system", 1) + b"\x94" + b"h\x00h\x01\x93(" + \
            _text(cmd, 1) + b"tR."
        out.append((f"STACK_GLOBAL memo p{p}", "os.system", memo))
        rot = _head(p) + _global("_codecs", "encode", p) + b"(" + _text("bf", 1) + _text("rot13", 1) + b"tR" + \
            _text("system", 1) + b"\x93(" + _text(cmd, 1) + b"tR."
        out.append((f"STACK_GLOBAL computed p{p}", "_codecs.encode with str, 'rot13'", rot))
    return out


READER = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from plugins.face_nms.eval_bin import read_bin
    results = []
    for path in sys.argv[3:]:
        before = set(sys.modules)
        try:
            read_bin(path)
            message = None
        except ValueError as exc:
            message = str(exc)
        results.append({"path": path, "message": message, "new_modules": sorted(set(sys.modules) - before)})
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
''')


def test_hostile_pickles_are_refused_in_one_line_and_nothing_runs(tmp_path):
    sentinel = tmp_path / "ran"
    cases = payloads(sentinel)
    paths = []
    for i, (label, _, data) in enumerate(cases):
        path = tmp_path / f"hostile-{i}.bin"
        path.write_bytes(data)
        paths.append(str(path))
    out = tmp_path / "results.json"
    # in a process of its own: a payload that ran could exit or replace anything in this one
    r = subprocess.run([sys.executable, "-c", READER, ROOT, str(out), *paths], capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0 and out.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    results = json.load(open(out))
    assert len(results) == len(cases) > 300
    for (label, named, _), res in zip(cases, results):
        assert res["message"] is not None, label
        assert len(res["message"].splitlines()) == 1, (label, res["message"])
        assert res["message"].startswith(f"--bin {res['path']} is not an evaluation .bin pickle"), (label, res)
        assert named in res["message"], (label, named, res["message"])
        assert res["new_modules"] == [], (label, res["new_modules"])
    assert not sentinel.exists()


def test_a_file_that_is_not_regular_or_too_large_is_refused_unread(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^--bin /dev/zero is not a regular file \(a device, pipe or socket\)"):
        read_bin("/dev/zero")
    fifo = tmp_path / "pipe.bin"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="pipe.bin is not a regular file"):
        read_bin(str(fifo))
    import plugins.face_nms.eval_bin as eval_bin
    big = tmp_path / "big.bin"
    big.write_bytes(pickle.dumps(([JPEG, JPEG], [True])))
    monkeypatch.setattr(eval_bin, "MAX_BYTES", 16)
    with pytest.raises(ValueError, match=rf"big.bin holds {os.path.getsize(big)} bytes, more than 16"):
        read_bin(str(big))
