"""SDXL teachers and LoRA students, offline on CPU: tiny random SD / SDXL pipelines built here (toy/tiny_sd.py), driven
through the real CLI and checked against diffusers' own pipelines and load_lora_weights."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minisplam as ms
from toy import tiny_sd
from toy.tiny_sd import make_tiny_sd
from test_sd import _error, _png, data, generate  # noqa: F401  (the shared data fixture)
from test_sd import _train as train_cli
from test_sd import pipeline_ddim, sd_step_teacher_solve


@pytest.fixture(scope="session")
def xl(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_xl") / "teacher"
    tiny_sd.main([str(out), "--arch", "sdxl"])                       # the CLI: python -m toy.tiny_sd OUT --arch sdxl
    return str(out)


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd") / "teacher"))


def _train(teacher, data, out, *extra):
    return train_cli(teacher, data, out, "--validate-every", "0", *extra)


def _pipe(teacher):
    from diffusers import DiffusionPipeline, LCMScheduler

    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=10.0,
                                              original_inference_steps=50, clip_sample=False)
    return pipe


def _images(pipe, prompts, steps):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, height=16, width=16,
                generator=torch.Generator().manual_seed(3), output_type="pt").images


def test_sdxl_is_recognised_and_conditions_as_its_pipeline(xl):
    """Both text encoders, the pooled embeddings and the null condition (force_zeros_for_empty_prompt) are the
    pipeline's own; the teacher's eps at w = 1 through our wrapper equals the UNet called as the pipeline does."""
    sd = ms.load_sd(xl)
    assert sd.xl and type(sd.pipe).__name__ == "StableDiffusionXLPipeline"
    cond = ms.encode_prompts(sd, ["a red square", "a blue square"], "cpu", resolution=16)
    emb, _, pooled, _ = sd.pipe.encode_prompt(["a red square", "a blue square"], do_classifier_free_guidance=False)
    assert torch.equal(cond["encoder_hidden_states"], emb) and torch.equal(cond["text_embeds"], pooled)
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    null = ms.encode_prompts(sd, [""], "cpu", null=True)
    assert sd.pipe.config.force_zeros_for_empty_prompt and null["encoder_hidden_states"].abs().max() == 0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 259])
    direct = sd.unet(x, t, emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": cond["time_ids"]}).sample
    assert torch.equal(ms.unet_eps(sd.unet, sd.sched, "epsilon")(x, t, cond), direct)
    # time ids from the data: original (h, w), crop top-left in the resized image, target size
    px, ids = ms.load_image(__import__("io").BytesIO(_png((9, 9, 9), size=(40, 20))), 16, crop_seed=None)
    assert px.shape == (3, 16, 16) and ids.tolist() == [20, 40, 0, 8, 16, 16]


def test_sdxl_gamma_path_vanishes_at_one(xl):
    sd = ms.load_sd(xl)
    student = ms.add_gamma_path(sd.unet, "authors")
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight)                 # random gamma-path weights
    cond = ms.encode_prompts(sd, ["a cat", "a dog"], "cpu")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 259])
    eps = ms.unet_eps(student, sd.sched, "epsilon", gamma_kind="authors")
    plain = ms.unet_eps(ms.drop_gamma_path(student), sd.sched, "epsilon")
    assert torch.equal(eps(x, t, cond, torch.ones(2)), plain(x, t, cond))
    assert not torch.allclose(eps(x, t, cond, torch.zeros(2)), plain(x, t, cond))


def test_sdxl_full_trains_resumes_and_exports_an_sdxl_pipeline(xl, data, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    full = _train(xl, data, tmp_path / "a", "--max-steps", "3", "--checkpoint-every", "1", "--k", "20")
    _train(xl, data, tmp_path / "b", "--max-steps", "2", "--checkpoint-every", "2", "--k", "20")
    resumed = _train(xl, data, tmp_path / "b", "--max-steps", "3", "--checkpoint-every", "1", "--k", "20", "--resume")
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-9) and all(l > 0 for l in full["losses"])
    out = tmp_path / "exported"
    ms.main(["export", "--run", str(tmp_path / "a"), "--out", str(out)])
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim is None
    for steps in (1, 4):
        ref = _images(pipe, ["a red square", "a blue square"], steps)
        ours = generate(str(tmp_path / "a"), ["a red square", "a blue square"], steps, seed=3, resolution=16)
        print(f"SDXL export vs our sampler, {steps} step(s): max abs diff {(ours - ref).abs().max():.2e}")
        assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_lora_trains_only_adapters_keeps_the_teacher_resumes_and_exports_for_load_lora_weights(
        arch, sd15, xl, data, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    teacher = xl if arch == "sdxl" else sd15
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--k", "20", "--lr", "1e-2"]
    full = _train(teacher, data, tmp_path / "a", "--max-steps", "4", "--checkpoint-every", "2", *lora)
    _train(teacher, data, tmp_path / "b", "--max-steps", "2", "--checkpoint-every", "2", *lora)
    resumed = _train(teacher, data, tmp_path / "b", "--max-steps", "4", "--checkpoint-every", "2", *lora, "--resume")
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-9)
    ck = tmp_path / "a" / "checkpoint-0000004"
    assert {p.name for p in ck.iterdir()} == {"student.safetensors", "optimizer.pt", "state.json"}   # no EMA copy
    saved = load_file(ck / "student.safetensors")
    assert saved and all("lora_" in k or "cond_proj" in k for k in saved)     # only the adapters and the gamma path
    assert any("cond_proj" in k for k in saved)

    # the teacher is the student with its adapters off: after training its base weights are the teacher's, bit
    # for bit, and the adapters did move
    sd = ms.load_run(tmp_path / "a")
    base = DiffusionPipeline.from_pretrained(teacher).unet.state_dict()
    weights = {k.replace(".base_layer", ""): v for k, v in sd.unet.state_dict().items()
               if "lora_" not in k and "cond_proj" not in k}
    assert weights.keys() == base.keys() and all(torch.equal(weights[k], base[k]) for k in base)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)

    out = tmp_path / "lora"
    ms.main(["export", "--run", str(tmp_path / "a"), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == [ms.LORA_FILE]
    pipe = _pipe(teacher)
    teacher_images = _images(pipe, ["a red square", "a blue square"], 4)
    pipe.load_lora_weights(out)
    for steps in (1, 4):
        ref = _images(pipe, ["a red square", "a blue square"], steps)
        ours = generate(str(tmp_path / "a"), ["a red square", "a blue square"], steps, seed=3, resolution=16)
        diff = (ours - ref).abs().max().item()
        with capsys.disabled():
            print(f"{arch} LoRA: load_lora_weights pipeline vs our sampler, {steps} step(s): max abs diff {diff:.2e}")
        assert diff < 1e-6
    assert (ref - teacher_images).abs().max() > 1e-3                          # the LoRA changes the 4-step images

    # sample accepts the exported LoRA plus its base model, and refuses it without one
    ms.main(["sample", "--model", str(out), "--base-model", teacher, "--prompt", "a red square", "--steps", "4",
             "--seed", "3", "--out", str(tmp_path / "s"), "--resolution", "16"])
    assert (tmp_path / "s" / "00000.png").is_file()
    assert "--base-model" in _error(capsys, ["sample", "--model", str(out), "--prompt", "x", "--out",
                                             str(tmp_path / "s2")])


def test_bad_lora_and_vae_inputs_are_refused_before_loading(sd15, data, tmp_path, capsys):
    err = _error(capsys, ["train", "--teacher", sd15, "--data", data, "--output-dir", str(tmp_path / "r"),
                          "--pretrained-vae", str(tmp_path / "novae")])
    assert "--pretrained-vae" in err and not (tmp_path / "r").exists()
    assert "must be >= 0" in _error(capsys, ["train", "--teacher", sd15, "--data", data, "--output-dir",
                                             str(tmp_path / "r"), "--lora-rank", "-1"])


def test_pretrained_vae_replaces_the_teachers(sd15, data, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae")
    torch.nn.init.zeros_(vae.decoder.conv_out.weight)
    vae.save_pretrained(tmp_path / "vae")
    _train(sd15, data, tmp_path / "r", "--max-steps", "1", "--checkpoint-every", "1",
           "--pretrained-vae", str(tmp_path / "vae"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["pretrained_vae"] == str(tmp_path / "vae")
    sd = ms.load_run(tmp_path / "r")
    assert sd.pipe.vae.decoder.conv_out.weight.abs().max() == 0


@pytest.mark.parametrize("argv", [["--model", "tiny-sdxl", "--lora", "4"], ["--model", "tiny", "--gradient-checkpointing"],
                                  ["--model", "tiny", "--skip-train"]])
def test_benchmark_runs_sdxl_lora_and_full(argv, tmp_path, capsys):
    """The benchmark's plumbing (its figures are not asserted): every objective, the JSON, the sampling latency."""
    import sys
    sys.path.insert(0, str(Path(ms.__file__).parent / "benchmarks"))
    import bench_sd

    bench_sd.main([*argv, "--reps", "1", "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "b.json")])
    res = json.loads((tmp_path / "b.json").read_text())
    assert [r["config"] for r in res["train"]] == ([] if "--skip-train" in argv else
                                                   ["LCM k=20", "SPLAD k=20", "SPLAD k=100 ME"])
    assert all(r["s_per_step"] > 0 for r in res["train"]) and sorted(res["latency_s"]) == ["1", "2", "4"]
    assert res["lora_rank"] == (4 if "--lora" in argv else 0)
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and ("n/a (CPU)" in out or "--skip-train" in argv)  # issue 21: no "peak nan GiB"


def test_sdxl_sd_step_teacher_solve_is_diffusers_guided_ddim(xl, monkeypatch):
    """As the SD test: sd_step's x_hat_{t-k} (k = 100, multiple estimation, w = 8) equals StableDiffusionXLPipeline
    with DDIMScheduler from the same latent, where the null condition carries the zero embeddings
    (force_zeros_for_empty_prompt), the zero pooled embedding and the images' own size/crop time ids."""
    prompts, w = ["a red square", "a blue circle"], 8.0
    x_t, x_s, ids, _ = sd_step_teacher_solve(xl, monkeypatch, prompts, 100, True, w, size=(30, 20))
    assert ids == [20, 30, 0, 4, 16, 16]                                  # original h, w; crop top, left; target
    micro = dict(original_size=tuple(ids[:2]), crops_coords_top_left=tuple(ids[2:4]), target_size=tuple(ids[4:]))
    ref = pipeline_ddim(xl, prompts, x_t, 5, 20, w, **micro)
    unguided = pipeline_ddim(xl, prompts, x_t, 5, 20, 1.0, **micro)
    err, effect = (x_s - ref).abs().max().item(), (ref - unguided).abs().max().item()
    print(f"SDXL: max |ours - diffusers| = {err:.1e}, guidance moves the point by {effect:.1e}")
    assert err < 1e-3 * effect
