"""Speed and memory of SPLAD training steps and few-step sampling, side by side in one run.

    python benchmarks/bench_sd.py                               # CPU: the tiny random SD (runs anywhere)
    python benchmarks/bench_sd.py --model tiny-sdxl --lora      # CPU: the tiny random SDXL, LoRA student
    python benchmarks/bench_sd.py --model sd15-shapes           # GPU: random weights, SD 1.5's shapes, 512 px, bf16
    python benchmarks/bench_sd.py --model sdxl-shapes --lora    # GPU: random weights, SDXL's shapes, 1024 px, bf16
    python benchmarks/bench_sd.py --model /path/to/teacher      # a real SD / SDXL teacher directory (or hub id)

Every configuration runs `minisplam.sd_step`, the exact training iteration `train` uses (VAE + text encoding, teacher
ODE solve, student forward/backward, AdamW, EMA or, for LoRA, the stop-gradient target), with the student built by
the functions `train` uses (add_gamma_path, add_lora), so the ratios are the ones training sees. Targets from the
issues (H100, bf16): k=100 with multiple estimation <= 1.8x a k=20 step; 4-step SD 1.5 sampling of one 512 px image
< 0.15 s; SD 1.5 batch 8 full-UNet training within 24 GiB with gradient checkpointing, within 12 GiB with LoRA.
`--json FILE` also writes the figures.
"""

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch

import minisplam as ms
from toy.tiny_sd import make_tiny_sd

CONFIGS = [("LCM k=20", dict(objective="lcm", k=20)),
           ("SPLAD k=20", dict(objective="splam", k=20)),
           ("SPLAD k=100 ME", dict(objective="splam", k=100))]


def shapes_pipeline(xl: bool, device, dtype):
    """A pipeline of randomly initialised parts with SD 1.5's or SDXL's configs (built on the device: fast)."""
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tiny = make_tiny_sd(tempfile.mkdtemp() + "/t")                     # only for its local tokenizer files
    tok = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer", model_max_length=77)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77)
    with torch.device(device):
        if xl:
            unet = UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                        cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                                        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                                        addition_embed_type="text_time", addition_time_embed_dim=256,
                                        projection_class_embeddings_input_dim=2816,
                                        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                                        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
            big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                                   hidden_act="gelu")
            extra = dict(text_encoder_2=CLIPTextModelWithProjection(big_g), tokenizer_2=tok)
        else:
            unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                        cross_attention_dim=768, attention_head_dim=8,
                                        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
            extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024 if xl else 512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=0.13025 if xl else 0.18215)
        te = CLIPTextModel(clip_l)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          steps_offset=1)
    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline)(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, **extra)
    fp32_unet = copy.deepcopy(unet)                                     # the full student starts from fp32 weights
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval().to(device, dtype)
    return ms.StableDiffusion(pipe, pipe.unet, ms.vp_schedule(sched.alphas_cumprod).to(device), "epsilon"), fp32_unet


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
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-sdxl', 'sd15-shapes', 'sdxl-shapes' or a teacher")
    p.add_argument("--lora", type=int, nargs="?", const=64, default=0, help="a LoRA student of this rank (64)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (SD 1.5) / 4 (SDXL) on GPU, 2 on CPU")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (SD 1.5) / 1024 (SDXL) / 16 (tiny)")
    p.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"], help="default bf16 on GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--gamma-features", default="authors", choices=sorted(ms.GAMMA_FEATURES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--skip-train", action="store_true", help="only the sampling latency")
    p.add_argument("--compile", action="store_true", help="sample with torch.compile(mode='reduce-overhead')")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prec = a.precision or ("bf16" if device.type == "cuda" else "no")
    low = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    if a.model in ("sd15-shapes", "sdxl-shapes"):
        sd, fp32_unet = shapes_pipeline(a.model == "sdxl-shapes", device, low)
        res = a.resolution or (1024 if sd.xl else 512)
    else:
        path = make_tiny_sd(tempfile.mkdtemp() + "/t", arch="sdxl" if a.model == "tiny-sdxl" else "sd") \
            if a.model in ("tiny", "tiny-sdxl") else ms.resolve_teacher(a.model)
        sd, fp32_unet = ms.load_sd(path, device, low), None
        res = a.resolution or (16 if a.model.startswith("tiny") else 1024 if sd.xl else 512)
    batch = a.batch or (2 if device.type == "cpu" else 4 if sd.xl else 8)
    student, target = ms.make_student(sd, device, a.gamma_features, a.gradient_checkpointing, a.lora, fp32_unet=fp32_unet)
    del fp32_unet
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    head = (f"device: {dev_name}; model: {a.model}; {'LoRA rank ' + str(a.lora) if a.lora else 'full UNet'}; {res} px; "
            f"batch {batch}; precision {prec}; gradient checkpointing {a.gradient_checkpointing}")
    print(head, flush=True)

    g0 = torch.Generator().manual_seed(0)
    data = {"pixels": torch.rand(batch, 3, res, res, generator=g0) * 2 - 1, "text": ["a photo of a cat"] * batch,
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch)}
    uncond1 = ms.encode_prompts(sd, [""], device, null=True)
    rows = []
    for name, over in [] if a.skip_train else CONFIGS:
        cfg = ms.SPLADConfig(w=8.0, gamma_features=a.gamma_features, **over)
        opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=8e-6, weight_decay=0.0)
        step = [0]

        def one():
            g = torch.Generator(device).manual_seed(step[0])
            step[0] += 1
            ms.sd_step(sd, student, student, target, opt, cfg, data, uncond1, g, low)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sec = timed(one, device, warmup=a.warmup, reps=a.reps)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None    # not measured on a CPU
        rows.append({"config": name, "s_per_step": sec, "peak_GiB": mem})
        print(f"  {name}: {sec:.4f} s/step" + (f", peak {mem:.2f} GiB" if mem is not None else ""), flush=True)
        del opt
    base = {r["config"]: r["s_per_step"] for r in rows}.get("SPLAD k=20", 1.0)
    print(f"\n{'training step':<18}{'s/step':>10}{'vs SPLAD k=20':>15}{'peak GiB':>10}")
    for r in rows:
        r["vs_splad_k20"] = r["s_per_step"] / base
        mem = "n/a (CPU)" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f}"
        print(f"{r['config']:<18}{r['s_per_step']:>10.4f}{r['vs_splad_k20']:>14.2f}x{mem:>10}")

    if a.lora:                                      # as after load_lora_weights (not fused): adapters on every layer
        net, what = student.eval(), "LoRA student, not fused"
    else:                                           # what `export` writes: the teacher's architecture, in `prec`
        with torch.device(device):
            net, what = ms.drop_gamma_path(student).to(device, low).eval(), "exported UNet"
    if a.compile:
        net, what = torch.compile(net, mode="reduce-overhead"), what + ", torch.compile"
    model = ms.unet_eps(net, sd.sched, sd.prediction_type, dtype=low)                 # gamma = 1
    cond = ms.encode_prompts(sd, ["a photo of a cat"], device, resolution=res)
    latency = {}
    print(f"\n{f'sampling (1 image, {what} + VAE decode)':<50}{'seconds':>10}")
    for steps in (1, 2, 4):
        def gen():
            g = torch.Generator(device).manual_seed(0)
            x_T = torch.randn(ms.latent_shape(sd, 1, res), generator=g, device=device)
            with torch.no_grad(), torch.autocast(device.type, dtype=low, enabled=low != torch.float32):
                ms.decode_latents(sd, ms.sample(model, x_T, cond, sd.sched, ms.lcm_timesteps(steps), g))
        latency[steps] = timed(gen, device, warmup=a.warmup, reps=a.reps)
        print(f"{f'{steps} step(s)':<50}{latency[steps]:>10.4f}")
    if a.json:
        ms._write_atomic(ms.Path(a.json), json.dumps({"setting": head, "model": a.model, "lora_rank": a.lora,
                                                      "resolution": res, "batch": batch, "precision": prec,
                                                      "gradient_checkpointing": a.gradient_checkpointing,
                                                      "train": rows, "latency_s": latency, "latency_model": what}, indent=1))


if __name__ == "__main__":
    main()
