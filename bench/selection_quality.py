"""Selection quality on a simulated identity set with known structure (CPU, a few minutes).

Each identity has a few capture sessions of near-identical faces (session sizes long-tailed, as in
web-crawled data: some sessions are bursts of video frames) plus a few sparse hard variations.
The same model (an MLP embedding with an ArcFace head, trained for the same number of epochs) is
trained on all faces and on subsets chosen by Face-NMS, random sampling and the three ablations
(random per identity, global-only ranking, local-only NMS in random order), at kept ratios 0.3..1.0.
Held-out faces are drawn uniformly over each identity's sessions and hard variations; reported:
closed-set identification accuracy (nearest class weight) and TAR at FAR = 1e-4 on all pairs.
Selection uses the observed features themselves as the proxy features.
"""
import argparse
import os
import time

import numpy as np
import torch

from common import RESULTS, ROOT, save, save_figure, table
from plugins.face_nms.select import run_method

METHODS = {"nms": "Face-NMS (hard-first)", "random": "random", "global": "global-only", "local": "local-only"}


def simulate(n_ids, dim, seed):
    rng = np.random.default_rng(seed)
    latent = 16
    mix = rng.standard_normal((latent * 2, dim)) / np.sqrt(latent)  # features are a nonlinear view of the latent
    train, test = [], []
    for k in range(n_ids):
        mu = rng.standard_normal(latent)
        sessions = [mu + 0.7 * rng.standard_normal(latent) for _ in range(int(rng.integers(2, 6)))]
        for s in sessions:
            size = int(min(1 + rng.zipf(1.7), 80))
            train += [(s + 0.08 * rng.standard_normal(latent), k) for _ in range(size)]
            test += [(s + 0.08 * rng.standard_normal(latent), k) for _ in range(2)]
        hard = int(rng.integers(1, 4))
        train += [(mu + 1.1 * rng.standard_normal(latent), k) for _ in range(hard)]
        test += [(mu + 1.1 * rng.standard_normal(latent), k) for _ in range(2 * len(sessions))]

    def view(items):
        z = np.stack([z for z, _ in items])
        x = np.concatenate([z, np.tanh(z)], axis=1) @ mix
        x += 0.05 * rng.standard_normal(x.shape)
        return x.astype(np.float32), np.array([k for _, k in items])

    return view(train), view(test)


class ArcFace(torch.nn.Module):
    def __init__(self, emb, classes, s=32.0, m=0.4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(classes, emb) * 0.01)
        self.s, self.m = s, m

    def forward(self, e, y):
        cos = torch.nn.functional.linear(torch.nn.functional.normalize(e), torch.nn.functional.normalize(self.w))
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        target = torch.cos(theta.gather(1, y[:, None]) + self.m)
        logits = cos.scatter(1, y[:, None], target) * self.s
        return torch.nn.functional.cross_entropy(logits, y)


def train_and_eval(x, y, xt, yt, n_ids, epochs, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.BatchNorm1d(256), torch.nn.PReLU(),
                              torch.nn.Linear(256, 128))
    head = ArcFace(128, n_ids)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * max(1, len(x) // 128)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x) - 127, 128):
            idx = perm[s:s + 128]
            loss = head(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        e = torch.nn.functional.normalize(net(torch.from_numpy(xt)))
        w = torch.nn.functional.normalize(head.w)
        acc = float((e @ w.T).argmax(1).eq(torch.from_numpy(yt)).float().mean())
        sim = (e @ e.T).numpy()
    iu = np.triu_indices(len(yt), 1)
    scores, same = sim[iu], (yt[:, None] == yt[None, :])[iu]
    neg = np.sort(scores[~same])[::-1]
    thr = neg[max(0, int(len(neg) * 1e-4) - 1)]
    tar = float((scores[same] > thr).mean())
    return acc, tar


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--identities", type=int, default=300)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--ratios", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    ratios = [float(r) for r in args.ratios.split(",")]
    t0 = time.time()
    res = {m: {r: [] for r in ratios} for m in METHODS}
    full = []
    n_faces = []
    for seed in range(args.seeds):
        (x, y), (xt, yt) = simulate(args.identities, args.dim, seed)
        n_faces.append(len(x))
        full.append(train_and_eval(x, y, xt, yt, args.identities, args.epochs, seed))
        for m in METHODS:
            for r in ratios:
                sel = run_method(m, x, y, ratio=r, seed=seed)
                res[m][r].append(train_and_eval(x[sel.keep], y[sel.keep], xt, yt, args.identities, args.epochs,
                                                seed) + (sel.fraction,))
    mean = lambda v, i: float(np.mean([t[i] for t in v]))  # noqa: E731
    rows = [["all faces", 1.0, mean(full, 0), mean(full, 1)]]
    for m in METHODS:
        for r in ratios:
            rows.append([METHODS[m], mean(res[m][r], 2), mean(res[m][r], 0), mean(res[m][r], 1)])
    text = table(["training set", "kept", "ident. acc", "TAR@FAR=1e-4"], rows)
    at60 = {METHODS[m]: {"acc": mean(res[m][0.6], 0), "tar": mean(res[m][0.6], 1)} for m in METHODS if 0.6 in ratios}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, metric in enumerate(["identification accuracy", "TAR@FAR=1e-4"]):
        for m in METHODS:
            axes[i].plot(ratios + [1.0], [mean(res[m][r], i) for r in ratios] + [mean(full, i)], "o-",
                         label=METHODS[m])
        axes[i].set_xlabel("kept ratio")
        axes[i].set_ylabel(metric)
        axes[i].grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"simulated set: {args.identities} identities, {int(np.mean(n_faces))} training faces, "
                 f"{args.seeds} seeds")
    png = os.path.join(RESULTS, "selection_quality.png")
    save_figure(fig, png)
    print(f"\n{time.time() - t0:.0f} s")
    save("selection_quality", {"params": vars(args), "all_faces": {"acc": mean(full, 0), "tar": mean(full, 1)},
                               "at_0.6": at60, "table": text, "plot": os.path.relpath(png, ROOT),
                               "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
