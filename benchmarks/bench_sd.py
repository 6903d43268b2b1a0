"""Speed and memory of SPLAD training steps and few-step sampling, side by side in one run.

    python benchmarks/bench_sd.py                               # CPU: the tiny random SD (runs anywhere)
    python benchmarks/bench_sd.py --model sd15-shapes           # GPU: random weights, SD 1.5's shapes, 512 px, bf16
    python benchmarks/bench_sd.py --model /path/to/sd15         # a real teacher directory (or hub id)

Every configuration runs `minisplam.sd_step`, the exact training iteration `train` uses
(VAE + text encoding, teacher ODE solve, student forward/backward, AdamW, EMA), so the
ratios are the ones training sees. Targets from the issue (H100, bf16, 512 px):
k=100 with multiple estimation <= 1.8x a k=20 step; 4-step sampling of one image < 0.15 s;
batch 8 with gradient checkpointing fits in 24 GiB.
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch

import minisplam as ms

CONFIGS = [("LCM k=20", dict(objective="lcm", k=20)),
           ("SPLAD k=20", dict(objective="splam", k=20)),
           ("SPLAD k=100 ME", dict(objective="splam", k=100))]


def sd15_shapes(device, dtype):
    """Randomly initialised UNet / VAE / CLIP text encoder with Stable Diffusion 1.5's configs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77))
    tiny = ms.make_tiny_sd(tempfile.mkdtemp())                      # only for its local tokenizer files
    tok = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer", model_max_length=77)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for m in (unet, vae, te):
        m.requires_grad_(False).eval().to(device, dtype)
    sd = ms.StableDiffusion(unet, vae, te, tok, dict(sched.config), ms.vp_schedule(sched.alphas_cumprod).to(device),
                            "epsilon")
    student = ms.GammaUNet(copy.deepcopy(unet).float().requires_grad_(True)).train()
    return sd, student


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny', 'sd15-shapes' or a teacher path / hub id")
    p.add_argument("--batch", type=int, default=None, help="default 8 (GPU) / 2 (CPU)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15) / 16 (tiny)")
    p.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"], help="default bf16 on GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prec = a.precision or ("bf16" if device.type == "cuda" else "no")
    low = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    if a.model == "tiny":
        path = ms.make_tiny_sd(tempfile.mkdtemp())
        sd = ms.load_sd(path, device, low)
        student, _ = ms.make_student(path, device, a.gradient_checkpointing)
        res, batch = a.resolution or 16, a.batch or 2
    elif a.model == "sd15-shapes":
        sd, student = sd15_shapes(device, low)
        student.to(device)
        if a.gradient_checkpointing:
            student.unet.enable_gradient_checkpointing()
        res, batch = a.resolution or 512, a.batch or 8
    else:
        sd = ms.load_sd(a.model, device, low)
        student, _ = ms.make_student(a.model, device, a.gradient_checkpointing)
        res, batch = a.resolution or 512, a.batch or 8
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev_name}; model: {a.model}; {res} px; batch {batch}; precision {prec}; "
          f"gradient checkpointing {a.gradient_checkpointing}")

    pixels = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a photo of a cat"] * batch
    uncond1 = ms.encode_prompts(sd, [""], device)
    rows = []
    for name, over in CONFIGS:
        cfg = ms.SPLADConfig(w=8.0, **over)
        st = student                          # one student for all configs: timing does not depend on weights
        tgt = copy.deepcopy(st).requires_grad_(False).eval()
        opt = torch.optim.AdamW(st.parameters(), lr=8e-6, weight_decay=0.0)
        step = [0]

        def one():
            g = torch.Generator(device).manual_seed(step[0])
            step[0] += 1
            ms.sd_step(sd, st, st, tgt, opt, cfg, pixels, prompts, uncond1, g, low)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sec = timed(one, device, warmup=a.warmup, reps=a.reps)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, sec, mem))
        del tgt, opt

    base = dict((n, s) for n, s, _ in rows)["SPLAD k=20"]
    print(f"\n{'training step':<18}{'s/step':>10}{'vs SPLAD k=20':>15}{'peak GiB':>10}")
    for name, sec, mem in rows:
        print(f"{name:<18}{sec:>10.4f}{sec / base:>14.2f}x{mem:>10.2f}")

    unet = student.unet if low == torch.float32 else student.unet.to(low)
    model = ms.unet_eps(unet, sd.sched, sd.prediction_type, dtype=low)
    cond = ms.encode_prompts(sd, ["a photo of a cat"], device)
    print(f"\n{'sampling (1 image, UNet + VAE decode)':<40}{'seconds':>10}")
    for steps in (1, 2, 4):
        def gen():
            g = torch.Generator(device).manual_seed(0)
            x_T = torch.randn(ms.latent_shape(sd, 1, res), generator=g, device=device)
            with torch.no_grad():
                ms.decode_latents(sd, ms.sample(model, x_T, cond, sd.sched, ms.lcm_timesteps(steps), g))
        print(f"{f'{steps} step(s)':<40}{timed(gen, device, warmup=a.warmup, reps=a.reps):>10.4f}")


if __name__ == "__main__":
    main()
