"""Image-scale toy: SPLAM / LCM on pixel images vs the best training-free few-step solvers (incl. AMED).

    python toy/image_toy.py                      # offline default: sklearn digits at 16x16, CPU, <= 15 min
    python toy/image_toy.py --data cifar10 --cifar PATH/cifar-10-python.tar.gz --device cuda   # GPU setting

Data. The default is scikit-learn's `load_digits` (1,797 8x8 images, 10 classes), upsampled to 16x16.
It ships inside a PyPI package, so it runs anywhere with no download. CIFAR-10 (32x32) is read from its
standard python archive; if the archive is missing, you get the download instruction, never a silent switch.

Teacher. A class-conditional diffusers `UNet2DConditionModel` without cross-attention (classes through its
class embedding; ε-prediction, SD's scaled-linear schedule, 10% label dropout for classifier-free guidance),
trained here as an ordinary DDPM. It is SD's UNet class, so the student gets the gamma path exactly as the SD
student does (`time_cond_proj_dim`, gamma as `timestep_cond`). Alternatively `--teacher DIR_OR_HUB_ID` loads such
a UNet + scheduler (an unconditional teacher runs with w = 1).

Methods, all from the same teacher, scored on the same noise:
  * LCM and SPLAM distilled with `minisplam.splad_loss`, same budget and seed. The gamma path is attached
    exactly as in the SD student (`minisplam.add_gamma_path`: gamma enters the time MLP's input);
  * DDIM, DPM-Solver++(2M) and UniPC through diffusers' schedulers (not re-implemented);
  * iPNDM and AMED-Solver (arXiv 2312.00094, CVPR 2024) in EDM's sigma parameterisation of the
    same VP model. AMED's predictor g_phi(h, t_{n+1}, t_n) -> (r_n, c_n) reads the UNet's mid-block feature
    (channel-mean pooled), is trained against a teacher trajectory with M intermediate steps (Alg. 1 there),
    and uses the analytical first step (AFS) for odd NFE.
Metrics: error to the teacher's many-step ODE output from the same noise, and a Fréchet distance in the
features of a classifier trained on the data (a clearly labelled FID proxy; no Inception weights here).
Outputs in toy/out/: image_toy.json, per-class grids image_toy_<method>.png, and a table with the winner per NFE.
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import numpy_to_pil

import minisplam as ms
from toy import measure

OUT = Path(__file__).resolve().parent / "out"
FULL_OUT, FULL_ITERS = Path(__file__).resolve().parent / "results" / "image_toy_full", 1500


def full_out(seed: int) -> Path:
    """Where `--full` writes: image_toy_full for seed 0 (the first committed run), image_toy_full_seedN otherwise."""
    return FULL_OUT if seed == 0 else FULL_OUT.with_name(f"{FULL_OUT.name}_seed{seed}")
NFES = (2, 3, 4, 5, 8)

# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def load_digits16():
    """scikit-learn's 8x8 digits, bilinearly upsampled to 16x16, in [-1, 1]; (N, 1, 16, 16), labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(d.target), 10


def load_cifar10(path):
    """CIFAR-10 train set from the standard python archive (tar.gz) or its extracted folder."""
    import pickle
    import tarfile

    p = Path(path) if path else None
    if p is None or not p.exists():
        raise ms.UsageError(
            f"CIFAR-10 not found at {path!r}. Download 'cifar-10-python.tar.gz' (CIFAR-10 python version, "
            "https://www.cs.toronto.edu/~kriz/cifar.html) and pass --cifar PATH (the .tar.gz or the extracted "
            "cifar-10-batches-py folder). Without it, use the offline default --data digits.")
    batches = []
    if p.is_dir():
        for f in sorted(p.glob("data_batch_*")):
            batches.append(pickle.loads(f.read_bytes(), encoding="bytes"))
    else:
        with tarfile.open(p) as tf:
            for m in sorted(tf.getmembers(), key=lambda m: m.name):
                if "data_batch_" in m.name:
                    batches.append(pickle.loads(tf.extractfile(m).read(), encoding="bytes"))
    if not batches:
        raise ms.UsageError(f"{p} holds no data_batch_* files: is it the CIFAR-10 *python* version?")
    x = torch.cat([torch.tensor(b[b"data"]) for b in batches]).reshape(-1, 3, 32, 32).float() / 127.5 - 1
    y = torch.cat([torch.tensor(b[b"labels"]) for b in batches])
    return x, y, 10


# ----------------------------------------------------------------------------------------
# Teacher: a class-conditional UNet2DModel trained as an ordinary DDPM
# ----------------------------------------------------------------------------------------


def make_unet(channels: int, size: int, n_classes, width: int = 16):
    """SD's UNet class with self-attention only (no text): classes through num_class_embeds (+1 for null)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels,
                                block_out_channels=(width, 2 * width, 2 * width), layers_per_block=1,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                mid_block_type="UNetMidBlock2D", attention_head_dim=8,
                                num_class_embeds=None if n_classes is None else n_classes + 1, norm_num_groups=8)


def train_teacher(x, y, n_classes, sched, iters, batch, lr, seed, width=16, device="cpu"):
    """eps-prediction DDPM with label dropout 10% (label n_classes = null) for guidance."""
    torch.manual_seed(seed)
    g, sched = torch.Generator().manual_seed(seed), sched.to(device)
    unet = make_unet(x.shape[1], x.shape[-1], n_classes, width).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for _ in range(iters):
        i = torch.randint(0, len(x), (batch,), generator=g)
        x0, lab = x[i].to(device), y[i].clone()
        lab[torch.rand(batch, generator=g) < 0.1] = n_classes
        t = torch.randint(0, sched.T, (batch,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        a, s = ms.alpha_sigma(sched, t, x0)
        loss = F.mse_loss(unet(a * x0 + s * noise, t, None, class_labels=lab.to(device)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
    return unet.eval().requires_grad_(False)


def load_teacher(path_or_id, device="cpu"):
    """A diffusers UNet2DConditionModel + scheduler (local dir or hub id); returns (unet, sched, pred, n_classes or None)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet" if (Path(path_or_id) / "unet").is_dir() else None)
        sch = DDPMScheduler.from_pretrained(path_or_id, subfolder="scheduler" if (Path(path_or_id) / "scheduler").is_dir() else None)
    except OSError as e:
        raise ms.UsageError(f"could not load the teacher {path_or_id!r} ({e})") from e
    pred = ms.check_prediction_type(sch.config.prediction_type)
    n = unet.config.num_class_embeds
    return unet.eval().requires_grad_(False).to(device), ms.vp_schedule(sch.alphas_cumprod).to(device), pred, \
        (None if n is None else n - 1), dict(sch.config)


# ----------------------------------------------------------------------------------------
# EDM's sigma view of the VP model, for iPNDM and AMED (x~ = x / alpha, sigma~ = sigma / alpha)
# ----------------------------------------------------------------------------------------


class EDMView:
    """Continuous sigma~ <-> fractional timestep for a discrete VP schedule (log-linear in between)."""

    def __init__(self, sched: ms.VPSchedule):
        self.log_sig = (sched.sigma / sched.alpha).double().log()            # increasing in t
        self.sigma_min, self.sigma_max = self.log_sig[0].exp().item(), self.log_sig[-1].exp().item()

    def t_of(self, sig: torch.Tensor) -> torch.Tensor:
        ls = sig.double().log().clamp(self.log_sig[0], self.log_sig[-1])
        i = torch.searchsorted(self.log_sig.to(ls.device), ls).clamp(1, len(self.log_sig) - 1)
        lo, hi = self.log_sig.to(ls.device)[i - 1], self.log_sig.to(ls.device)[i]
        return ((i - 1) + (ls - lo) / (hi - lo)).float()


def uniform_sigmas(n_steps: int, view: "EDMView", T: int = 1000) -> torch.Tensor:
    """Time-uniform schedule t = T-1 ... 0 mapped to sigma~: AMED's choice for DDPM backbones (its Sec. 4)."""
    t = torch.linspace(T - 1, 0, n_steps + 1).round().long()
    return view.log_sig[t].exp().float()


def poly_sigmas(n_steps: int, sig_min: float, sig_max: float, rho: float = 7.0) -> torch.Tensor:
    """AMED's Eq. (10) (EDM's schedule): n_steps + 1 points from sig_max down to sig_min."""
    i = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    return ((sig_max ** (1 / rho) + i * (sig_min ** (1 / rho) - sig_max ** (1 / rho))) ** rho).float()


class EDMEps:
    """eps(x~, sigma~) of the guided teacher, with the UNet's mid-block feature kept for AMED.
    `labels` / `null` cover the largest batch; a smaller batch uses their first entries."""

    def __init__(self, unet, view: EDMView, pred, labels, null, w):
        self.unet, self.view, self.pred, self.labels, self.null, self.w = unet, view, pred, labels, null, w
        self.h = None
        self.hook = unet.mid_block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, out):
        self.h = out.mean(dim=(2, 3))                                         # channel-mean pooled

    def __call__(self, x_tilde, sig):
        sig = sig.to(x_tilde.device)                                          # schedules are built on the CPU
        sig = sig.expand(x_tilde.shape[0]) if sig.ndim == 0 else sig
        t = self.view.t_of(sig)
        alpha = ms._bc((1 + sig**2) ** -0.5, x_tilde)
        sigma = ms._bc(sig, x_tilde) * alpha
        x = x_tilde * alpha

        def teacher(xx, tt, cc):
            kw = {} if self.labels is None else {"class_labels": cc}
            aa, ss = alpha.repeat(len(xx) // len(x), 1, 1, 1), sigma.repeat(len(xx) // len(x), 1, 1, 1)
            return ms.eps_from_output(self.unet(xx, tt, None, **kw).sample, xx, aa, ss, self.pred)

        n = len(x)
        labels, null = (None, None) if self.labels is None else (self.labels[:n], self.null[:n])
        eps = ms.guided_eps(teacher, x, t, labels, null, self.w)
        self.h = self.h[: len(x)]                                             # conditional half
        return eps


@torch.no_grad()
def ipndm_sample(eps_fn, x_T, sigmas):
    """iPNDM (improved PNDM, as in DEIS / AMED): Adams-Bashforth in sigma~ with up to 4 past eps."""
    x = x_T * sigmas[0]
    hist = []
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        hist = [eps_fn(x, s_cur)] + hist[:3]
        coef = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[len(hist)]
        x = x + (s_next - s_cur) * sum(c * e for c, e in zip(coef, hist))
    return x


class AMEDPredictor(nn.Module):
    """g_phi(h, t_{n+1}, t_n) -> (r_n, c_n), AMED Fig. 6: pooled feature -> 2 FC, concat time emb, FC, sigmoid.
    r in (0, 1) (r = 0.5 at init: DPM-Solver-2's geometric mean), c in (0, 2) (c = 1 at init)."""

    def __init__(self, feat: int, hidden: int = 32, t_dim: int = 16):
        super().__init__()
        self.t_dim = t_dim
        self.feat = nn.Sequential(nn.Linear(feat, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden + 2 * t_dim, 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h, sig_next, sig_cur):
        sig_next, sig_cur = sig_next.to(h.device), sig_cur.to(h.device)
        temb = torch.cat([get_timestep_embedding(100 * sig_next.log().expand(len(h)), self.t_dim, downscale_freq_shift=0),
                          get_timestep_embedding(100 * sig_cur.log().expand(len(h)), self.t_dim, downscale_freq_shift=0)], 1)
        rc = torch.sigmoid(self.out(torch.cat([self.feat(h), temb], 1)))
        return rc[:, :1], 2 * rc[:, 1:]


def amed_step(eps_fn, x, sig_cur, sig_next, r, c, eps_cur):
    """AMED-Solver, AMED Eq. (9): s = sig_next^r sig_cur^(1-r); Euler to s; x + c (sig_next - sig_cur) eps(x_s, s).
    (In the paper's notation t_{n+1} = sig_cur, t_n = sig_next.) r = 0.5, c = 1 is DPM-Solver-2."""
    s = sig_next**r * sig_cur ** (1 - r)                                      # (B, 1)
    x_s = x + ms._bc(s.squeeze(1) - sig_cur, x) * eps_cur
    e_s = eps_fn(x_s, s.squeeze(1))
    return x + ms._bc(c.squeeze(1), x) * (sig_next - sig_cur) * e_s


def _amed_direction(eps_fn, g_phi, x, n, s_cur, afs):
    """eps at t_{n+1} and the pooled mid-block feature; with AFS the first direction is x/sigma (0 NFE)."""
    if n == 0 and afs:
        return x / s_cur, torch.zeros(len(x), g_phi.feat[0].in_features, device=x.device)
    return eps_fn(x, s_cur), eps_fn.h.detach()


@torch.no_grad()
def amed_sample(eps_fn, g_phi, x_T, sigmas, afs: bool):
    """AMED-Solver sampling (AMED Alg. 2): per step one eval at t_{n+1}, g_phi, one eval at s_n."""
    x = x_T * sigmas[0]
    for n, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps_cur, h = _amed_direction(eps_fn, g_phi, x, n, s_cur, afs)
        r, c = g_phi(h, s_next, s_cur)
        x = amed_step(eps_fn, x, s_cur, s_next, r, c, eps_cur)
    return x


def amed_nfe_plan(nfe: int):
    """(steps, AFS) for an NFE budget: 2 evaluations a step, AFS saves one (odd NFE)."""
    return ((nfe + 1) // 2, True) if nfe % 2 else (nfe // 2, False)


@torch.no_grad()
def teacher_trajectory(eps_fn, x_T, sigmas, M: int):
    """Reference points at `sigmas`, with M extra Heun steps between each pair (AMED Eq. 13, poly interp)."""
    x = x_T * sigmas[0]
    traj = [x]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        sub = poly_sigmas(M + 1, s_next.item(), s_cur.item())
        for a, b in zip(sub[:-1], sub[1:]):
            d = eps_fn(x, a)
            x_e = x + (b - a) * d
            x = x + (b - a) * 0.5 * (d + eps_fn(x_e, b))                      # Heun (EDM)
        traj.append(x)
    return traj


def train_amed(eps_fn, feat_dim, sigmas, afs, shape, n_train, batch, epochs, M, seed, lr=1e-2, device="cpu"):
    """AMED Alg. 1: distil g_phi against teacher trajectories; returns (g_phi, n params, seconds)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    g_phi = AMEDPredictor(feat_dim).to(device)
    opt = torch.optim.Adam(g_phi.parameters(), lr=lr)
    data = []
    for i in range(0, n_train, batch):
        x_T = torch.randn((min(batch, n_train - i), *shape), generator=g).to(device)
        data.append((x_T, teacher_trajectory(eps_fn, x_T, sigmas, M)))
    for _ in range(epochs):
        for x_T, traj in data:                                                # AMED Alg. 1
            x = x_T * sigmas[0]
            for n, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
                with torch.no_grad():
                    eps_cur, h = _amed_direction(eps_fn, g_phi, x, n, s_cur, afs)
                r, c = g_phi(h, s_next, s_cur)
                x_next = amed_step(eps_fn, x, s_cur, s_next, r, c, eps_cur)
                loss = ((x_next - traj[n + 1]) ** 2).mean()                  # Eq. (14), L2
                opt.zero_grad(set_to_none=True)
                loss.backward()                                               # N-1 backprops per loop
                opt.step()
                x = x_next.detach()
    return g_phi, sum(p.numel() for p in g_phi.parameters()), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------
# Metrics: error to the teacher ODE, and a Fréchet distance in a trained classifier's features
# ----------------------------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self, channels, size, n_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * (size // 4) ** 2, 64), nn.SiLU())
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y, n_classes, iters, seed, device="cpu"):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    test, train = perm[: len(x) // 5], perm[len(x) // 5:]
    x, y = x.to(device), y.to(device)
    net = Classifier(x.shape[1], x.shape[-1], n_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(iters):
        i = train[torch.randint(0, len(train), (128,), generator=g)]
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    return net.eval().requires_grad_(False), acc


def inception_fid(samples, real):
    """FID with torchmetrics when it and its Inception weights are available; else (None, reason)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, normalize=True)
        rgb = lambda im: ((im.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1).cpu()
        fid.update(rgb(real), real=True)
        fid.update(rgb(samples), real=False)
        return fid.compute().item(), None
    except Exception as e:                                   # no torchmetrics, no weights offline, ...
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def frechet(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two feature sets."""
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    return ((m1 - m2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * tr_sqrt).item()


# ----------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------


def distill(objective, teacher_unet, sched, pred, x, y, n_classes, w, iters, batch, lr, seed, k, device="cpu",
            gamma_features="authors", gamma_one_share=0.5, curve_every=0, curve_fn=None):
    """LCM or SPLAM with minisplam.splad_step (Alg. 1); the gamma path attached as in the SD student. Returns the EMA
    target with the gamma path dropped (the model sampling uses), the training seconds and the learning curve:
    curve_fn(eps of the EMA target at gamma = 1) -> dict, every `curve_every` iterations (0: none)."""
    cfg = ms.SPLADConfig(objective=objective, k=k, k_phi=20, w=w, loss="l2", gamma_features=gamma_features,
                         gamma_one_share=gamma_one_share)
    torch.manual_seed(seed)
    g = torch.Generator(device).manual_seed(seed)
    student = ms.add_gamma_path(teacher_unet, cfg.gamma_features).requires_grad_(True).train()
    target = copy.deepcopy(student).requires_grad_(False).eval()
    teacher = ms.unet_eps(teacher_unet, sched, pred, cond_arg="class_labels")
    student_eps, target_eps = (ms.unet_eps(m, sched, pred, cond_arg="class_labels", gamma_kind=cfg.gamma_features)
                               for m in (student, target))
    conditional = teacher_unet.config.num_class_embeds is not None          # else: no labels at all, w = 1
    null = torch.full((batch,), n_classes, device=device) if conditional else None
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    t0, curve, train_s = time.perf_counter(), [], 0.0
    for it in range(iters + 1):
        if curve_every and (it % curve_every == 0 or it == iters):
            train_s += time.perf_counter() - t0
            curve.append({"iter": it, "train_s": train_s, **curve_fn(target_eps)})
            print(f"{objective} iter {it}: " + " ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if k != "iter"),
                  flush=True)
            t0 = time.perf_counter()
        if it == iters:
            break
        i = torch.randint(0, len(x), (batch,), generator=g, device=device).cpu()
        ms.splad_step(student_eps, target_eps, teacher, x[i].to(device), y[i].to(device) if conditional else None,
                      null, sched, cfg, opt, (target, student), g)
    return ms.drop_gamma_path(target), train_s + time.perf_counter() - t0, curve


def save_class_grid(x, labels, n_classes, path, per_class=8, zoom=4):
    """Rows = classes, columns = samples; pixels enlarged `zoom` times (nearest) so 16 px digits are readable."""
    rows = []
    for c in range(n_classes):
        xc = x[labels == c][:per_class]
        rows.append(torch.cat(list(xc), dim=-1))
    img = ((torch.cat(rows, dim=-2)[None] + 1) / 2).clamp(0, 1)
    img = F.interpolate(img, scale_factor=zoom, mode="nearest").expand(1, 3, -1, -1)
    numpy_to_pil(img.permute(0, 2, 3, 1).numpy())[0].save(path)


def plot_curves(curves, n, path):
    """Error to the teacher ODE vs distillation iteration (the image toy's Fig. 2b); `curves` is one run's
    {method: curve} or a list of them (seeds: one thin line each, one colour per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toy import palette

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, steps in zip(axes, (1, 4)):
        for i, run in enumerate([curves] if isinstance(curves, dict) else curves):
            for name, c in run.items():
                ax.plot([r["iter"] for r in c], [r[f"err_{steps}"] for r in c], color=palette.color(name),
                        lw=1.5 if isinstance(curves, dict) else 1, label=name if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("distillation iteration", fontsize=11)
        ax.set_ylabel(f"{steps}-step RMS error to teacher ODE (pixels in [−1, 1])", fontsize=11)
        ax.set_title(f"{steps} step{'s' * (steps > 1)}, EMA student, {n} fixed noises", fontsize=11)
        ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--cifar", default=None, help="path to cifar-10-python.tar.gz or cifar-10-batches-py/")
    p.add_argument("--teacher", default=None, help="diffusers UNet2DConditionModel dir / hub id instead of training one")
    p.add_argument("--teacher-iters", type=int, default=1500)
    p.add_argument("--width", type=int, default=16, help="UNet base channels (32+ for CIFAR on a GPU)")
    p.add_argument("--distill-iters", type=int, default=250)
    p.add_argument("--k", type=int, default=100, help="skipping step (100 = with multiple estimation, k_phi 20)")
    p.add_argument("--w", type=float, default=2.0, help="guidance scale (paper's w)")
    p.add_argument("--gamma-features", default="authors", choices=sorted(ms.GAMMA_FEATURES))
    p.add_argument("--gamma-one-share", type=float, default=0.5, help="the paper: 0 (gamma ~ U[0, 1])")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--ode-steps", type=int, default=100)
    p.add_argument("--amed-train", type=int, default=256, help="AMED: trajectories to train g_phi on")
    p.add_argument("--amed-epochs", type=int, default=8)
    p.add_argument("--ipndm-schedule", default="poly", choices=["uniform", "poly"],
                   help="iPNDM time points; AMED's Sec. 4 uses EDM's rho=7 polynomial schedule")
    p.add_argument("--amed-schedule", default="uniform", choices=["uniform", "poly"],
                   help="AMED-Solver time points; AMED's Sec. 4 uses time-uniform for DDPM backbones")
    p.add_argument("--amed-M", type=int, default=2)
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--classifier-iters", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve-every", type=int, default=50, help="evaluate the EMA student every N iterations")
    p.add_argument("--curve-n", type=int, default=100, help="noises of the learning curve (the first of --n-eval)")
    p.add_argument("--full", action="store_true",
                   help=f"the committed long run: --distill-iters {FULL_ITERS}, --curve-every 100, --out {FULL_OUT}[_seedN]")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.full:
        a.distill_iters, a.curve_every = max(a.distill_iters, FULL_ITERS), 100
        a.out = full_out(a.seed) if a.out == OUT else a.out
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    nfes = [int(n) for n in a.nfes.split(",")]
    t_start = time.perf_counter()
    timing = {}

    x, y, n_classes = load_digits16() if a.data == "digits" else load_cifar10(a.cifar)
    t0 = time.perf_counter()
    if a.teacher:
        unet, sched, pred, tc, sched_config = load_teacher(a.teacher, a.device)
        w = a.w if tc is not None else 1.0
    else:
        from diffusers import DDPMScheduler

        sched_config = dict(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").config)
        sched, pred = ms.sd_schedule(), "epsilon"
        unet = train_teacher(x, y, n_classes, sched, a.teacher_iters, a.batch, 2e-3, a.seed, a.width, a.device)
        tc, w = n_classes, a.w
    timing["teacher_s"] = time.perf_counter() - t0
    print(f"teacher ready in {timing['teacher_s']:.0f}s", flush=True)

    dev = torch.device(a.device)
    sched = sched.to(dev)
    clf, clf_acc = train_classifier(x, y, n_classes, a.classifier_iters, a.seed, dev)
    g = torch.Generator().manual_seed(1000 + a.seed)
    labels = (torch.arange(a.n_eval) % n_classes).to(dev)
    null = torch.full_like(labels, n_classes)
    cond, uncond = (labels, null) if tc is not None else (None, None)
    x_T = torch.randn((a.n_eval, *x.shape[1:]), generator=g).to(dev)
    teacher_eps = ms.unet_eps(unet, sched, pred, cond_arg="class_labels")
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = measure.ode_sample(teacher_eps, x_T, cond, uncond, w, sched, a.ode_steps)
        timing["reference_s"] = time.perf_counter() - t0
    real_x = x[torch.randperm(len(x), generator=g)[: a.n_eval]].to(dev)
    real_feat = clf.body(real_x)
    fid_probe, fid_reason = inception_fid(real_x[:8], real_x[8:16])          # is real FID possible here?

    def score(samples):
        with torch.no_grad():
            out = {"fd_proxy": frechet(clf.body(samples.clamp(-1, 1)), real_feat),
                   "err_to_ode": (samples - ref).flatten(1).norm(dim=1).div(math.sqrt(ref[0].numel())).mean().item()}
            if fid_reason is None:
                out["fid"] = inception_fid(samples, real_x)[0]
            return out

    results = {"teacher ODE (%d steps)" % a.ode_steps: {"ref": score(ref)}}
    grids = {"teacher": ref}

    # --- training-free solvers from diffusers, at equal NFE (one guided evaluation = 1 NFE) ----
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(sched_config, timestep_spacing="trailing", prediction_type="epsilon")   # we pass eps
    makers = {"DDIM": lambda: DDIMScheduler.from_config(common, clip_sample=False, set_alpha_to_one=True),
              "DPM-Solver++(2M)": lambda: DPMSolverMultistepScheduler.from_config(
                  common, algorithm_type="dpmsolver++", solver_order=2),
              "UniPC": lambda: UniPCMultistepScheduler.from_config(common, solver_order=2)}
    guided = lambda xx, t: ms.guided_eps(teacher_eps, xx, t, cond, uncond, w)
    for name, make in makers.items():
        results[name] = {n: score(measure.scheduler_sample(make(), guided, x_T, n)) for n in nfes}
    view = EDMView(sched)
    schedules = {"uniform": lambda n: uniform_sigmas(n, view, sched.T),
                 "poly": lambda n: poly_sigmas(n, view.sigma_min, view.sigma_max)}
    edm = EDMEps(unet, view, pred, cond, uncond, w)
    results["iPNDM"] = {n: score(ipndm_sample(edm, x_T, schedules[a.ipndm_schedule](n))) for n in nfes}
    amed_info, amed_models = {}, {}
    results["AMED-Solver"] = {}
    for n in nfes:
        steps, afs = amed_nfe_plan(n)
        sig = schedules[a.amed_schedule](steps)
        edm_train = EDMEps(unet, view, pred, None if tc is None else (torch.arange(a.amed_train) % n_classes).to(dev),
                           None if tc is None else torch.full((a.amed_train,), n_classes, device=dev), w)
        g_phi, n_par, secs = train_amed(edm_train, unet.config.block_out_channels[-1], sig, afs,
                                        tuple(x.shape[1:]), a.amed_train, a.batch, a.amed_epochs, a.amed_M, a.seed,
                                        device=dev)
        edm_train.hook.remove()
        amed_models[n] = (g_phi, sig, afs)
        with torch.no_grad():
            results["AMED-Solver"][n] = score(amed_sample(edm, g_phi, x_T, sig, afs))
        amed_info[n] = {"steps": steps, "afs": afs, "params": n_par, "train_s": secs}
        print(f"AMED NFE={n}: {steps} steps, AFS={afs}, g_phi {n_par} params, trained in {secs:.0f}s", flush=True)
    grids["DPM-Solver++(2M) NFE=4"] = measure.scheduler_sample(makers["DPM-Solver++(2M)"](), guided, x_T, 4)
    for n in (3, 4):
        if n in amed_models:
            with torch.no_grad():
                grids[f"AMED-Solver NFE={n}"] = amed_sample(edm, *amed_models[n][:1], x_T, *amed_models[n][1:])

    # --- distillation: LCM and SPLAM, same budget and seed ------------------------------------------
    n_c = min(a.curve_n, a.n_eval)

    def curve_fn(eps):                      # error to the teacher ODE on the first n_c noises, 1 and 4 steps
        with torch.no_grad():
            return {f"err_{n}": (ms.sample(eps, x_T[:n_c], None if cond is None else cond[:n_c], sched,
                                           ms.lcm_timesteps(n, sched.T), torch.Generator(dev).manual_seed(5))
                                 - ref[:n_c]).flatten(1).norm(dim=1).div(math.sqrt(ref[0].numel())).mean().item()
                    for n in (1, 4)}

    curves = {}
    for objective, name in (("lcm", "LCM"), ("splam", "SPLAM")):
        net, secs, curves[name] = distill(objective, unet, sched, pred, x, y, n_classes, w, a.distill_iters, a.batch,
                                          a.lr, a.seed, a.k, dev, a.gamma_features, a.gamma_one_share,
                                          a.curve_every, curve_fn)
        timing[f"{name}_s"] = secs
        model = ms.unet_eps(net, sched, pred, cond_arg="class_labels")
        out = {}
        for n in sorted(set(nfes) | {1}):
            samp = ms.sample(model, x_T, cond, sched, ms.lcm_timesteps(n, sched.T), torch.Generator(dev).manual_seed(5))
            out[n] = score(samp)
            if n in (1, 4):
                grids[f"{name} NFE={n}"] = samp
        results[f"{name} (k={a.k})"] = out
        print(f"{name} distilled in {secs:.0f}s", flush=True)

    # --- report ---------------------------------------------------------------------------------------
    methods = [m for m in results if not m.startswith("teacher")]
    winners = {}
    for n in nfes:
        cands = {m: results[m][n]["fd_proxy"] for m in methods if n in results[m]}
        winners[n] = min(cands, key=cands.get)
    lines = [f"{'FD-proxy (lower is better)':<26}" + "".join(f"{'NFE ' + str(n):>10}" for n in nfes)]
    for m in methods:
        lines.append(f"{m:<26}" + "".join(f"{results[m][n]['fd_proxy']:>10.2f}" if n in results[m] else f"{'-':>10}"
                                          for n in nfes))
    lines.append(f"{'error to teacher ODE':<26}" + "".join(f"{'NFE ' + str(n):>10}" for n in nfes))
    for m in methods:
        lines.append(f"{m:<26}" + "".join(f"{results[m][n]['err_to_ode']:>10.3f}" if n in results[m] else f"{'-':>10}"
                                          for n in nfes))
    teacher_fd = results["teacher ODE (%d steps)" % a.ode_steps]["ref"]["fd_proxy"]
    for name, imgs in grids.items():
        save_class_grid(imgs.cpu(), labels.cpu(), n_classes, a.out / f"image_toy_{name.replace(' ', '_').replace('=', '')}.png")
    timing["total_s"] = time.perf_counter() - t_start
    report = {"settings": {k: str(v) for k, v in vars(a).items()}, "classifier_accuracy": clf_acc,
              "fid_available": fid_reason is None, "fid_unavailable_reason": fid_reason,
              "teacher_fd_proxy": teacher_fd, "results": {m: {str(k): v for k, v in r.items()} for m, r in results.items()},
              "winners_by_nfe": winners, "amed": amed_info, "timing": timing, "curves": curves}
    (a.out / "image_toy.json").write_text(json.dumps(report, indent=1))
    if a.curve_every:
        plot_curves(curves, n_c, a.out / "image_toy_curve.png")
    print("\n".join(lines))
    print(f"teacher's own {a.ode_steps}-step ODE samples: FD-proxy {teacher_fd:.2f}. FD-proxy = Fréchet distance in the "
          f"features of a classifier trained on the data (held-out accuracy {clf_acc:.1%}); it is NOT FID.")
    if fid_reason is None:
        print("Inception FID (torchmetrics) is in image_toy.json next to the proxy.")
    else:
        print(f"Inception FID not computed ({fid_reason}); install torchmetrics[image] with its weights for FID.")
    for n, m in winners.items():
        print(f"NFE {n}: best FD-proxy is {m}")
    print(f"wrote {a.out}/image_toy.json and grids in {timing['total_s']:.0f}s")
    return report


if __name__ == "__main__":
    main()
