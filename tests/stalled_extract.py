"""An extraction in a child process whose model stops for good at a chosen batch.

Tests that interrupt an extraction wait for the state they need instead of racing a timer:
the child can never finish on its own, however fast or slow the machine is.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(rec_dir, out_dir, chunks, **popen):
    """Run extract_features(rec_dir, out_dir) in chunks of 16 rows (2 batches) that stops after `chunks` chunks.

    The model's first call is extract's probe of one image; call 2 + 2 * chunks never returns.
    """
    script = (f"import sys, time, torch; sys.path.insert(0, {ROOT!r})\n"
              "from plugins.face_nms.demo import TinyNet\n"
              "from plugins.face_nms.extract import extract_features\n"
              "from plugins.face_nms.models import TorchModel\n"
              "torch.set_num_threads(1)\n"
              "class Stalls(TorchModel):\n"
              "    calls = 0\n"
              "    def launch(self, images, flip):\n"
              "        Stalls.calls += 1\n"
              f"        while Stalls.calls >= {2 + 2 * int(chunks)}:\n"
              "            time.sleep(1)\n"
              "        return super().launch(images, flip)\n"
              f"extract_features({str(rec_dir)!r}, {str(out_dir)!r}, Stalls(TinyNet(seed=0), 'cpu'), batch_size=8,"
              " workers=0, chunk_rows=16, progress=False)\n")
    return subprocess.Popen([sys.executable, "-c", script], **popen)
