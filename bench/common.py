"""Shared bits of the benchmarks: machine description, tables, JSON results."""
import json
import os
import platform
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from plugins.face_nms.files import atomic_output  # noqa: E402


def machine():
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers, rows):
    cells = [[str(c) for c in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def save(name, result, out_dir=None):
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    result = dict(result, machine=machine(), command="python " + " ".join(
        [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))
    path = os.path.join(out_dir, f"{name}.json")
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nresult: {os.path.relpath(path, os.getcwd())}")
    return path


def save_figure(fig, path, dpi=90):
    """Writes a matplotlib figure under a temporary name, renames it, and closes it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
