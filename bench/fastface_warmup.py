"""FastFace's detector warm-up against the run length.

The recurrence starts from D = alpha * (L_1 - L_2). On a synthetic loss that falls steadily
(30 * exp(-t / (0.25 N)) + 3, Gaussian noise 0.3 per step), the first loss difference is set
to rise or fall, and the first decay is located for runs of N steps with the paper's settings.
An early decay at step T + 2 that depends on the sign of the first difference is the warm-up
artefact; a late one (when the loss flattens) is the plateau detection working.
"""
import argparse
import warnings

import numpy as np
import torch

from common import save, table
from plugins.fastface import FastFace


def first_decay(n, first_delta, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    losses = 30 * np.exp(-t / (0.25 * n)) + 3 + noise * rng.standard_normal(n)
    losses[1] = losses[0] - first_delta
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = FastFace(opt, n)
    for i, loss in enumerate(losses):
        sched.step(float(loss))
        if sched.get_last_lr()[0] < 1.0:
            return i, sched.patience
    return None, sched.patience


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="750,5000,20000,50000,100000,165000,200000,400000",
                   help="comma-separated run lengths N")
    p.add_argument("--first-deltas", default="-1.0,-0.3,0.3", help="L_1 - L_2 values (negative: the loss rose)")
    args = p.parse_args()
    rows, results = [], []
    for n in [int(s) for s in args.steps.split(",")]:
        for delta in [float(s) for s in args.first_deltas.split(",")]:
            step, patience = first_decay(n, delta)
            results.append({"steps": n, "patience": patience, "t_alpha": patience * 1e-3, "first_delta": delta,
                            "first_decay_step": step})
            rows.append([n, patience, patience * 1e-3, delta, "none" if step is None else step,
                         "-" if step is None else f"{step / n:.2f}",
                         "yes" if step == patience + 2 else "no"])
    text = table(["N", "T", "T*alpha", "L1-L2", "first decay at step", "of run", "warm-up artefact"], rows)
    save("fastface_warmup", {"results": results, "table": text})


if __name__ == "__main__":
    main()
