"""Per-step cost of FastFace against torch's PolynomialLR and ReduceLROnPlateau (same optimizer, two
param groups), cost of the first and last 10^4 steps, and state size after 10^5 steps."""
import argparse
import warnings
import pickle
import statistics
import time

import numpy as np
import torch

from common import save, table
from plugins.fastface import FastFace


def losses(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (10 * np.exp(-t / (n / 5)) + 2 + 0.05 * rng.standard_normal(n)).tolist()


def optimizer():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(8))]}, {"params": [torch.nn.Parameter(torch.zeros(8))]}]
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


SCHEDULERS = {
    "FastFace": (lambda opt, n: FastFace(opt, total_steps=n), True),
    "PolynomialLR": (lambda opt, n: torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=n), False),
    "ReduceLROnPlateau": (lambda opt, n: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1000), True),
}


def run(name, seq, block):
    make, takes_loss = SCHEDULERS[name]
    opt = optimizer()
    sched = make(opt, len(seq))
    times = []
    step = sched.step
    for s in range(0, len(seq), block):
        chunk = seq[s:s + block]
        t0 = time.perf_counter()
        if takes_loss:
            for v in chunk:
                step(v)
        else:
            for _ in chunk:
                step()
        times.append(time.perf_counter() - t0)
    return times, len(pickle.dumps(sched.state_dict()))


def main():
    warnings.filterwarnings("ignore", message="Detected call of")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--block", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    seq = losses(args.steps)
    res = {}
    for name in SCHEDULERS:
        runs = [run(name, seq, args.block) for _ in range(args.repeats)]
        total = statistics.median(sum(t) for t, _ in runs)
        res[name] = {"ns_per_step": total / args.steps * 1e9,
                     "first_block_ns_per_step": statistics.median(t[0] for t, _ in runs) / args.block * 1e9,
                     "last_block_ns_per_step": statistics.median(t[-1] for t, _ in runs) / args.block * 1e9,
                     "state_bytes": runs[0][1]}
    base = res["PolynomialLR"]["ns_per_step"]
    rows = [[n, r["ns_per_step"], r["ns_per_step"] / base, r["first_block_ns_per_step"], r["last_block_ns_per_step"],
             r["last_block_ns_per_step"] / r["first_block_ns_per_step"], r["state_bytes"]] for n, r in res.items()]
    text = table(["scheduler", "ns/step", "x PolynomialLR", "first 1e4 ns/step", "last 1e4 ns/step",
                  "last/first", "state bytes"], rows)
    save("scheduler_overhead", {"steps": args.steps, "block": args.block, "repeats": args.repeats,
                                "results": res, "table": text})


if __name__ == "__main__":
    main()
