"""FastFace's detector start against the run length, for both starts.

Two synthetic losses with Gaussian noise 0.3 per step, whose first difference L_1 - L_2 is set
to rise or fall, run with the paper's settings and either start (``reference_start=True``: the
authors' D = alpha * (L_1 - L_2); default: the line fitted to the first 2/alpha losses):

- decay: 30 * exp(-t / (0.25 N)) + 3. A first decay while the noiseless curve still falls by more
  than lambda per step is premature; the reference start's early decay lands at step T + 2.
- fall-then-flat: falls by 2 lambda = 1e-4 per step for the first half, flat after. The first
  decay should fall in the flat half.
"""
import argparse
import warnings

import numpy as np
import torch

from common import save, table
from plugins.fastface import FastFace

THRESHOLD = 5e-5
STARTS = {"reference": True, "default": False}


def decay_curve(n, rng):
    t = np.arange(n)
    return 30 * np.exp(-t / (0.25 * n)) + 3 + 0.3 * rng.standard_normal(n)


def fall_then_flat(n, rng, slope=2 * THRESHOLD):
    return 40.0 - slope * np.minimum(np.arange(n), n // 2) + 0.3 * rng.standard_normal(n)


def first_decay(losses, reference_start):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = FastFace(opt, len(losses), threshold=THRESHOLD, reference_start=reference_start)
    for i, loss in enumerate(losses.tolist()):
        sched.step(loss)
        if sched.get_last_lr()[0] < 1.0:
            return i, sched.patience
    return None, sched.patience


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="750,5000,20000,50000,100000,165000,200000,400000",
                   help="comma-separated run lengths N (decay curve)")
    p.add_argument("--flat-steps", default="5000,20000,100000,400000",
                   help="comma-separated run lengths N (fall-then-flat curve)")
    p.add_argument("--first-deltas", default="-1.0,-0.3,0.3", help="L_1 - L_2 values (negative: the loss rose)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    deltas = [float(s) for s in args.first_deltas.split(",")]
    rows, results = [], []
    for n in [int(s) for s in args.steps.split(",")]:
        for delta in deltas:
            losses = decay_curve(n, np.random.default_rng(args.seed))
            losses[1] = losses[0] - delta
            for start, reference_start in STARTS.items():
                step, patience = first_decay(losses, reference_start)
                fall = None if step is None else 120 / n * np.exp(-4 * step / n)
                results.append({"curve": "decay", "steps": n, "patience": patience, "t_alpha": patience * 1e-3,
                                "first_delta": delta, "start": start, "first_decay_step": step,
                                "decrease_per_step_there": fall})
                rows.append([n, patience, patience * 1e-3, delta, start, "none" if step is None else step,
                             "-" if step is None else f"{step / n:.2f}", "-" if step is None else f"{fall:.1e}",
                             "-" if step is None else ("yes" if fall > THRESHOLD else "no")])
    text = table(["N", "T", "T*alpha", "L1-L2", "start", "first decay at step", "of run",
                  "loss decrease/step there", "premature (> lambda)"], rows)
    flat_rows = []
    for n in [int(s) for s in args.flat_steps.split(",")]:
        for delta in (-1.0, 1.0):
            losses = fall_then_flat(n, np.random.default_rng(args.seed))
            losses[1] = losses[0] - delta
            for start, reference_start in STARTS.items():
                step, patience = first_decay(losses, reference_start)
                results.append({"curve": "fall-then-flat", "steps": n, "patience": patience, "first_delta": delta,
                                "start": start, "first_decay_step": step})
                flat_rows.append([n, patience, delta, start, "none" if step is None else step,
                                  "-" if step is None else f"{step / n:.2f}",
                                  "no" if step is None else ("yes" if step > n // 2 else "no")])
    print()
    flat_text = table(["N", "T", "L1-L2", "start", "first decay at step", "of run", "in the flat half"], flat_rows)
    save("fastface_warmup", {"results": results, "table": text, "table_fall_then_flat": flat_text})


if __name__ == "__main__":
    main()
