"""Stage 2 of the toy experiment alone: how well the translation registor learns the shifts.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/toy_registor.py --steps 2000 --pool mask --lr 1e-4

Trains a Registor(omega="translation") with L_g (Gaussian blur, --sigma; several values =
a curriculum in equal parts) on random --crop crops of the toy training annotations
(batch 1, Adam, --lr for the trunk, --head-lr for the last 1x1 conv), then compares
its output with the true translation of 20 held-out test pairs (the generator's shift,
re-drawn from the pair's seed), on the whole 240-px masks and on 40 random 128-px crops:
per axis the correlation, the slope of predicted on true (1 = no shrinkage) and the
spreads, and the median error |u - t| in px. --pool: mean (the spec), mask (mask-weighted,
coopseg.models.Registor(pool="mask")), conf (a learnt per-location confidence, softmax over
locations; tried and dropped). The README's "Toy experiment" quotes its numbers.
"""
import argparse, time, math, sys
import torch, torch.nn.functional as F
import coopseg_kernels as ck
from coopseg.models import Registor
from coopseg.losses import blur_kernel, registration_loss
from coopseg.train import random_crop
from coopseg.data import build_dataset

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--head-lr", type=float, default=0)
p.add_argument("--sigma", type=float, nargs="+", default=[8.0])  # curriculum: piecewise equal parts
p.add_argument("--crop", type=int, default=128)
p.add_argument("--pool", default="mean")  # mean | mask | conf
p.add_argument("--scale", type=float, default=8.0)
p.add_argument("--cos", action="store_true")
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
torch.manual_seed(a.seed)
reg = Registor(2, omega="translation" if a.pool != "conf" else "elastic", scale=a.scale,
               pool="mean" if a.pool == "conf" else a.pool)
if a.pool == "conf":
    head = torch.nn.Conv2d(128, 3, 1); torch.nn.init.zeros_(head.weight); torch.nn.init.zeros_(head.bias)
    reg.head = head
def fwd(p):
    if a.pool in ("mean", "mask"):
        return reg(p)
    x = p
    for b in reg.blocks: x = b(x)
    h = reg.head(x)
    u, c = h[:, :2] * reg.scale, h[:, 2:]
    w = torch.softmax(c.flatten(2), -1).view_as(c)
    return (u * w).sum((2, 3), keepdim=True)
head_params = list(reg.head.parameters())
other = [q for n, q in reg.named_parameters() if not n.startswith("head")]
opt = torch.optim.Adam([dict(params=other), dict(params=head_params, lr=a.head_lr or a.lr)], lr=a.lr)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps) if a.cos else None
ds = build_dataset("toy", spatial_dims=2, seed=0, split="train", n=200, size=240)
gen = torch.Generator().manual_seed(0)
t0 = time.time(); hist = []
for k in range(a.steps):
    sig = a.sigma[min(len(a.sigma) - 1, k * len(a.sigma) // a.steps)]
    kern = blur_kernel(sig)
    s = random_crop(ds[int(torch.randint(len(ds), (), generator=gen))], (a.crop,) * 2, (a.crop,) * 2, gen, 0.1)
    s1, s2 = s["s1"][None], s["s2"][None]
    c = fwd(torch.cat((s1, s2), 1))
    loss = registration_loss(ck.warp(s1, c), s2, kernel=kern)
    opt.zero_grad(); loss.backward(); opt.step()
    if sched: sched.step()
    hist.append(float(loss.detach()))
    if (k + 1) % max(1, a.steps // 5) == 0:
        print(f"step {k+1} L_g {sum(hist[-100:]) / len(hist[-100:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
test = build_dataset("toy", spatial_dims=2, seed=0, split="test", n=20, size=240)
def centroid(m):
    yy, xx = torch.meshgrid(torch.arange(m.shape[-2]), torch.arange(m.shape[-1]), indexing="ij")
    w = m[0]; return torch.stack([(w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()])
import numpy as np
def true_shift(seed):
    rng = np.random.default_rng(seed); n = int(rng.integers(2, 5)); rng.uniform(12, 28, n); rng.uniform(0, 1, (n, 2))
    rng.uniform(0, 1, n); rng.integers(2, 5, n); rng.uniform(0, 1, n)
    return torch.tensor(rng.integers(-32, 33, 2), dtype=torch.float)
def stats(crop):
    P, T = [], []
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for i in range(40 if crop < 240 else 20):
            q = test[i % 20]; s1, s2 = q["s1"], q["s2"]
            if crop < 240:
                c = random_crop(q, (crop,) * 2, (crop,) * 2, g, 0.0); s1, s2 = c["s1"], c["s2"]
                if s1.sum() < 50 or s2.sum() < 50: continue
            u = fwd(torch.cat((s1, s2), 0)[None]).flatten()
            P.append(u); T.append(-true_shift(test.seed + i % 20))  # warp samples s1 at x+u: u = -shift
    P, T = torch.stack(P), torch.stack(T)
    out = []
    for d in range(2):
        p, t = P[:, d], T[:, d]
        corr = torch.corrcoef(torch.stack([p, t]))[0, 1]
        slope = ((p - p.mean()) * (t - t.mean())).sum() / ((t - t.mean()) ** 2).sum()
        out.append(f"corr {corr:.2f} slope {slope:.2f} std {p.std():.1f}/{t.std():.1f}")
    err = (P - T).norm(dim=1).median()
    return f"n={len(P)} " + " | ".join(out) + f" | median |err| {err:.1f} px (median |t| {T.norm(dim=1).median():.1f})"
print(vars(a))
print("eval 240:", stats(240))
print("eval 128:", stats(128))
print(f"time {time.time() - t0:.0f}s")
