"""A tiny Stable Diffusion teacher that means something: coloured shapes named by their captions.

`python -m toy.tiny_sd` writes random SD components, whose images are noise. Here the UNet of such a
folder is trained for a few hundred steps as an ordinary text-conditioned diffusion model on captioned shapes
("red square", "blue circle", ...), so that its guided ODE maps noise to latents that depend on the prompt.
The tests and `benchmarks/learning_curve.py` distil it through the unchanged CLI (`python minisplam.py train`) and
measure the student's coupled few-step error to the teacher (`toy.measure.few_step_errors`), from the same noise
and prompts: the SD path (VAE latents, CLIP conditioning, sd_step, mixed precision, the EMA) is shown to learn.

    python toy/shapes_sd.py OUT_DIR [--steps 400]      # teacher in OUT_DIR/teacher, data in OUT_DIR/data
    python toy/shapes_sd.py OUT --steps 1500 --resolution 8 --n 512 --batch 32 --threads 1
        # the teacher committed in tests/data/shapes_teacher (its guided output depends on the prompt: tested)
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import minisplam as ms
from toy import measure
from toy.tiny_sd import make_tiny_sd

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
SHAPES = ("square", "circle")
CAPTIONS = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def shapes(n: int, resolution: int = 16, seed: int = 0):
    """n images (n, 3, R, R) in [-1, 1] on a grey background, and their captions; position and size jitter."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(CAPTIONS), (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(resolution) + 0.5, torch.arange(resolution) + 0.5, indexing="ij")
    centre = resolution / 2 + (torch.rand(n, 2, 1, 1, generator=g) - 0.5) * resolution / 4
    r = resolution * (0.2 + 0.1 * torch.rand(n, 1, 1, generator=g))
    dy, dx = yy - centre[:, 0], xx - centre[:, 1]
    circle = (idx % len(SHAPES) == 1)[:, None, None]
    mask = torch.where(circle, dx**2 + dy**2 <= r**2, torch.maximum(dx.abs(), dy.abs()) <= r)
    colour = torch.tensor(list(COLOURS.values()))[idx // len(SHAPES)][:, :, None, None]
    return torch.where(mask[:, None], colour, torch.zeros(())), [CAPTIONS[i] for i in idx]


def write_imagefolder(folder: Path, n: int, resolution: int = 16, seed: int = 0) -> Path:
    """The shapes as an imagefolder (PNGs + metadata.jsonl), what `minisplam.py train --data` reads."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=False)
    x, caps = shapes(n, resolution, seed)
    lines = []
    for i, (img, cap) in enumerate(zip(x, caps)):
        arr = ((img.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": cap}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def make_teacher(out: Path, steps: int = 400, n: int = 1024, resolution: int = 16, batch: int = 64,
                 lr: float = 2e-3, seed: int = 0) -> Path:
    """toy/tiny_sd.py, then its UNet trained as an eps-prediction DDPM on the shapes, 10% empty captions (for
    guidance). As in SD, the VAE's raw latents have std 1 / scaling_factor (0.18215): its encoder output is scaled
    by c and its decoder input by 1 / c (the same autoencoder), so the scaled latents the UNet sees have unit std."""
    make_tiny_sd(str(out), seed=seed)
    sd = ms.load_sd(str(out))
    x, caps = shapes(n, resolution, seed)
    g = torch.Generator().manual_seed(seed)
    vae, f = sd.pipe.vae, sd.pipe.vae.config.scaling_factor
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(g)
        z, c = z / z.std(), 1 / (f * z.std().item())                          # unit-std latents; raw std 1 / f
        ch = vae.config.latent_channels
        vae.quant_conv.weight[:ch] *= c                                         # posterior mean x c
        vae.quant_conv.bias[:ch] *= c
        vae.quant_conv.bias[ch:] += 2 * math.log(c)                             # posterior std x c
        vae.post_quant_conv.weight /= c                                         # decode(c z) = old decode(z)
        cond = ms.encode_prompts(sd, caps, "cpu")
        null = ms.encode_prompts(sd, [""], "cpu")
    unet = sd.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    torch.manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(n, (batch,), generator=g)
        c = torch.where((torch.rand(batch, generator=g) < 0.1)[:, None, None], null, cond[i])
        t = torch.randint(sd.sched.T, (batch,), generator=g)
        noise = torch.randn(z[i].shape, generator=g)
        a, s = ms.alpha_sigma(sd.sched, t, z[i])
        loss = F.mse_loss(unet(a * z[i] + s * noise, t, c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
    unet.save_pretrained(out / "unet")                       # the folder make_tiny_sd just created
    sd.pipe.vae.save_pretrained(out / "vae")
    return out


def reference(teacher_dir: str, prompts, w: float, seed: int = 0, ode_steps: int = 100, resolution: int = 16):
    """Fixed noise, the prompts' embeddings and the teacher's guided ODE (`ode_steps` DDIM steps over the whole
    range): what every student is measured against. Returns (sd, x_T, cond, ode) with ode(x, t) as
    toy.measure.few_step_errors takes it."""
    sd = ms.load_sd(teacher_dir)
    g = torch.Generator().manual_seed(10_000 + seed)
    x_T = torch.randn(ms.latent_shape(sd, len(prompts), resolution), generator=g)
    cond = ms.encode_prompts(sd, prompts, "cpu")
    uncond = ms.encode_prompts(sd, [""], "cpu").expand_as(cond)
    teacher = ms.unet_eps(sd.unet, sd.sched, sd.prediction_type)
    T = sd.sched.T
    solve = lambda x, t: measure.ode_sample(teacher, x, cond, uncond, w, sd.sched, max(1, round(ode_steps * (t + 1) / T)),
                                            t)
    from_T = solve(x_T, T - 1)                  # every 1-step error starts from x_T at T - 1: solved once, here
    ode = lambda x, t: from_T.clone() if t == T - 1 and torch.equal(x, x_T) else solve(x, t)
    return sd, x_T, cond, ode


def run_errors(run_or_teacher: str, sd, x_T, cond, ode, steps=(1, 2, 4)) -> dict:
    """Coupled few-step errors (toy.measure.few_step_errors) of a training run's EMA student or, given the teacher
    folder, of the untrained student: the teacher itself used as a few-step sampler."""
    unet = ms.load_run(run_or_teacher).unet if (Path(run_or_teacher) / "config.json").is_file() else sd.unet
    return measure.few_step_errors(ms.unet_eps(unet, sd.sched, sd.prediction_type), x_T, cond, sd.sched, ode, steps)[0]


def heldout_loss(run_or_teacher: str, sd, cfg: ms.SPLADConfig, n: int = 64, batch: int = 16, seed: int = 2,
                 resolution: int = 16) -> float:
    """The SPLAD loss (Eq. 17) of a run's latest student and EMA target (or, given the teacher folder, of the
    untrained pair) on held-out shapes, with fixed noise, t and gamma: the same draws for every model compared."""
    path = Path(run_or_teacher)
    student = ms.add_gamma_path(sd.unet, cfg.gamma_features)
    target = ms.add_gamma_path(sd.unet, cfg.gamma_features)
    if (path / "config.json").is_file():
        ckpt = ms.latest_checkpoint(path)
        ms.load_weights(student, ckpt / "student.safetensors")
        ms.load_weights(target, ckpt / "target.safetensors")
    x, caps = shapes(n, resolution, seed)
    g = torch.Generator().manual_seed(seed)
    eps = lambda m, kind=None: ms.unet_eps(m, sd.sched, sd.prediction_type, gamma_kind=kind)
    total = 0.0
    with torch.no_grad():
        uncond = ms.encode_prompts(sd, [""], "cpu")
        for i in range(0, n, batch):
            z0 = sd.pipe.vae.encode(x[i:i + batch]).latent_dist.sample(g) * sd.pipe.vae.config.scaling_factor
            cond = ms.encode_prompts(sd, caps[i:i + batch], "cpu")
            B = len(z0)
            t, gamma = ms.sample_timesteps(B, cfg, g), ms.sample_gamma(B, cfg, g)
            total += ms.splad_loss(eps(student, cfg.gamma_features), eps(target, cfg.gamma_features), eps(sd.unet),
                                   z0, cond, uncond.expand_as(cond), t, gamma, torch.randn(z0.shape, generator=g),
                                   sd.sched, cfg).item() * B
    return total / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--resolution", type=int, default=16, help="image size in px (latents are half of it)")
    p.add_argument("--n", type=int, default=1024, help="training images of the teacher")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    make_teacher(a.out / "teacher", a.steps, n=a.n, resolution=a.resolution, batch=a.batch)
    write_imagefolder(a.out / "data", 256, a.resolution, seed=1)
    print(f"wrote {a.out}/teacher and {a.out}/data in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
