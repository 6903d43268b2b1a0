"""Stable Diffusion path, offline on CPU: a tiny random SD built here, driven through the real CLI."""

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minisplam as ms
from toy.tiny_sd import make_tiny_sd

FAST = ["--resolution", "16", "--batch-size", "2", "--num-workers", "0", "--w", "3", "--lr", "1e-4"]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny") / "teacher"))


@pytest.fixture(scope="session")
def teacher_v(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_v") / "teacher"), prediction_type="v_prediction")


def _png(color, size=(20, 24)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """3 good image-caption pairs, 1 corrupt image, 1 row without a caption."""
    d = tmp_path_factory.mktemp("data")
    rows = []
    for i, (c, text) in enumerate([((200, 30, 30), "a red square"), ((30, 200, 30), "a green square"),
                                   ((30, 30, 200), "a blue square")]):
        (d / f"{i}.png").write_bytes(_png(c))
        rows.append({"file_name": f"{i}.png", "text": text})
    (d / "bad.png").write_bytes(b"this is not an image")
    rows.append({"file_name": "bad.png", "text": "corrupt"})
    rows.append({"file_name": "0.png"})
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(d)


def _train(teacher, data, out, *extra):
    return ms.main(["train", "--teacher", teacher, "--data", data, "--output-dir", str(out), *FAST, *extra])


# --- training, checkpoints, resume -------------------------------------------------------------


def test_train_writes_atomic_safetensors_checkpoints_and_validation(teacher, data, tmp_path):
    run = tmp_path / "run"
    res = _train(teacher, data, run, "--max-steps", "4", "--checkpoint-every", "2", "--validate-every", "4")
    assert res["step"] == 4 and len(res["losses"]) == 4 and all(l > 0 for l in res["losses"])
    assert res["skipped"] > 0                                         # the corrupt image was skipped, counted
    ck = run / (run / "latest").read_text()
    assert ck.name == "checkpoint-0000004"
    assert {p.name for p in ck.iterdir()} == {"student.safetensors", "target.safetensors", "optimizer.pt", "state.json"}
    assert not list(run.glob(".tmp-*"))
    grid = torch.from_numpy(np.array(Image.open(run / "validation" / "step-0000004.png"))).permute(2, 0, 1) / 255
    R = grid.shape[2] // 3                                    # rows: the two default prompts; columns: 1, 2, 4 steps
    assert grid.shape[1:] == (2 * R, 3 * R)
    sd, eps = ms.load_distilled(str(run))                     # the step-4 checkpoint's EMA student, as validated
    for j, steps in enumerate((1, 2, 4)):
        want = ms.generate_images(sd, eps, ["a photo of a cat", "a painting of a lighthouse at dusk"], steps, 0, R)
        for i in range(2):
            assert (grid[:, i * R:(i + 1) * R, j * R:(j + 1) * R] - want[i]).abs().max() <= 1 / 255 + 1e-6
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == res["losses"]
    assert all({"lr", "skipped", "time"} <= set(r) for r in rows) and rows[0]["lr"] == 1e-4
    assert any(f.endswith("bad.png (an unreadable image)") for r in rows for f in r.get("skipped_files", []))  # named, not just counted


def test_kill_and_resume_continues_the_same_run(teacher, data, tmp_path):
    full = _train(teacher, data, tmp_path / "a", "--max-steps", "4", "--checkpoint-every", "2", "--validate-every", "0")
    _train(teacher, data, tmp_path / "b", "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "0")
    resumed = _train(teacher, data, tmp_path / "b", "--max-steps", "4", "--checkpoint-every", "2",
                     "--validate-every", "0", "--resume")
    assert resumed["step"] == 4
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-9)
    from safetensors.torch import load_file

    for name in ("target.safetensors", "student.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoint-0000004" / name)
        b = load_file(tmp_path / "b" / "checkpoint-0000004" / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    oa = torch.load(tmp_path / "a" / "checkpoint-0000004" / "optimizer.pt", weights_only=True)
    ob = torch.load(tmp_path / "b" / "checkpoint-0000004" / "optimizer.pt", weights_only=True)
    assert all(torch.allclose(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"], atol=1e-9)
               for i in oa["state"])


def test_crash_while_checkpointing_keeps_the_last_checkpoint(teacher, data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _train(teacher, data, run, "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "0")
    import safetensors.torch

    calls = []

    def dying_save(model, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:                                           # killed half-way through
            raise KeyboardInterrupt("killed")
        return real(model, path, *a, **k)

    real = safetensors.torch.save_model
    monkeypatch.setattr(safetensors.torch, "save_model", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _train(teacher, data, run, "--max-steps", "4", "--checkpoint-every", "1", "--validate-every", "0", "--resume")
    assert (run / "latest").read_text() == "checkpoint-0000002"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000002"]
    monkeypatch.setattr(safetensors.torch, "save_model", real)
    res = _train(teacher, data, run, "--max-steps", "3", "--checkpoint-every", "1", "--validate-every", "0", "--resume")
    assert res["step"] == 3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(teacher, data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real, n = ms.splad_loss, []

    def flaky(*a, **k):
        n.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(n) == 3 else loss

    monkeypatch.setattr(ms, "splad_loss", flaky)
    with pytest.raises(SystemExit) as e:
        _train(teacher, data, run, "--max-steps", "5", "--checkpoint-every", "2", "--validate-every", "0")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "nan" in err and "checkpoint-0000002" in err
    assert (run / "latest").read_text() == "checkpoint-0000002"


# --- export and sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["epsilon", "v_prediction"])
def test_export_loads_in_diffusers_and_matches_our_sampler(which, teacher, teacher_v, data, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    t = teacher if which == "epsilon" else teacher_v
    run = tmp_path / "run"
    _train(t, data, run, "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "0", "--k", "20")
    out = tmp_path / "exported"
    ms.main(["export", "--run", str(run), "--out", str(out)])
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.prediction_type == which
    assert not [k for k in pipe.unet.state_dict() if "gamma" in k or "cond_proj" in k]   # teacher architecture
    assert pipe.unet.config.time_cond_proj_dim is None
    prompts = ["a red square", "a blue square"]
    for steps in (1, 2, 4):
        ref = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(3), output_type="pt").images
        ours = generate(str(out), prompts, steps, seed=3, resolution=16)
        from_run = generate(str(run), prompts, steps, seed=3, resolution=16)
        assert torch.allclose(ours, ref, atol=1e-4), (steps, (ours - ref).abs().max())
        assert torch.allclose(from_run, ours, atol=1e-5)


def test_sample_cli_writes_images_and_grid(teacher, data, tmp_path):
    run = tmp_path / "run"
    _train(teacher, data, run, "--max-steps", "1", "--checkpoint-every", "1", "--validate-every", "0")
    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\na dog\n")
    out = tmp_path / "s"
    ms.main(["sample", "--model", str(run), "--prompt", "a bird", "--prompts-file", str(pf), "--steps", "2",
             "--out", str(out), "--resolution", "16", "--batch-size", "2"])
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "grid.png",
                                                     "manifest.jsonl", "sample.json"]
    assert Image.open(out / "grid.png").size == (48, 16)


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for i, (payload, text) in enumerate(samples):
            for ext, data in (("png", payload), ("txt", text.encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """3 shards of 3 samples, captions 's<shard>-<i>'; sample s1-1 is corrupt."""
    d = tmp_path_factory.mktemp("shards")
    for s in range(3):
        _write_shard(d / f"shard-{s:03d}.tar", [(b"garbage" if (s, i) == (1, 1) else _png((80 * s, 60 * i, 100)),
                                                 f"s{s}-{i}") for i in range(3)])
    return str(d / "shard-{000..002}.tar")


def test_webdataset_shards_train_and_skip_corrupt(teacher, tmp_path):
    shard = _write_shard(tmp_path / "shard-000.tar", [(_png((255, 0, 0)), "red"), (b"garbage", "corrupt"),
                                                      (_png((0, 255, 0)), "green"), (_png((0, 0, 255)), "blue")])
    res = _train(teacher, shard, tmp_path / "run", "--max-steps", "3", "--checkpoint-every", "1",
                 "--validate-every", "0", "--batch-size", "4")     # 3 steps: the stream repeats past one epoch
    assert res["step"] == 3 and res["skipped"] == 3


def _captions(stream, n):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=stream.W if stream.W > 1 else 0)
    it = iter(loader)
    return [next(it)["text"] for _ in range(n)]


def test_shard_stream_resumes_exactly_and_splits_ranks(shards):
    full = _captions(ms.ShardStream(shards, 16, 2, seed=0, workers=2), 10)           # 10 batches: > 1 epoch
    w0 = [["s0-0", "s0-1"], ["s0-2", "s2-0"], ["s2-1", "s2-2"]] * 2                # worker 0: shards 0 and 2
    w1 = [["s1-0"], ["s1-2", "s1-0"], ["s1-2"]] * 2                                  # worker 1: shard 1 (1 corrupt)
    assert full == [b for pair in zip(w0, w1) for b in pair][:10]                    # the loader takes them in turn
    for start in (1, 3):                                                             # odd: the workers swap roles
        assert _captions(ms.ShardStream(shards, 16, 2, seed=0, start=start, workers=2), 10 - start) == full[start:]
    ranks = [sum(_captions(ms.ShardStream(shards, 16, 3, seed=0, rank=r, world=2), 2), []) for r in (0, 1)]
    assert {c[:2] for c in ranks[0]} == {"s0", "s2"} and {c[:2] for c in ranks[1]} == {"s1"}
    with pytest.raises(ms.UsageError, match="fewer --num-workers"):
        ms.ShardStream(shards, 16, 2, seed=0, world=2, workers=2)


def test_webdataset_kill_and_resume_continues_the_same_run(teacher, shards, tmp_path, capsys):
    args = ("--checkpoint-every", "1", "--validate-every", "0", "--random-crop")
    full = _train(teacher, shards, tmp_path / "a", "--max-steps", "4", *args, "--num-workers", "2")
    _train(teacher, shards, tmp_path / "b", "--max-steps", "1", *args, "--num-workers", "2")
    resumed = _train(teacher, shards, tmp_path / "b", "--max-steps", "4", *args, "--num-workers", "2", "--resume")
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-9)
    assert "warning" not in capsys.readouterr().err
    more = _train(teacher, shards, tmp_path / "b", "--max-steps", "5", *args, "--num-workers", "0", "--resume")
    assert more["step"] == 5 and "num_workers=2 (now 0)" in capsys.readouterr().err   # goes on, says batches differ


# --- bad input: clear, early errors --------------------------------------------------------------


def generate(model, prompts, steps, seed, resolution=None, base=None):
    """A run, an exported pipeline or a LoRA (+ base): one batch from our sampler, as `sample` makes it."""
    sd, eps = ms.load_distilled(model, "cpu", base)
    return ms.generate_images(sd, eps, prompts, steps, seed, resolution)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        ms.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_missing_teacher_dir(capsys, data, tmp_path):
    err = _error(capsys, ["train", "--teacher", str(tmp_path / "nope"), "--data", data, "--output-dir", str(tmp_path / "r")])
    assert "not found" in err and "hub id" in err


def test_teacher_dir_without_parts(capsys, data, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    err = _error(capsys, ["train", "--teacher", str(tmp_path / "half"), "--data", data, "--output-dir", str(tmp_path / "r")])
    assert "not a diffusers Stable Diffusion directory" in err and "vae" in err


def test_unsupported_prediction_type(capsys, data, tmp_path):
    t = make_tiny_sd(str(tmp_path / "x0teacher"))
    cfg = Path(t) / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "sample"}))  # an x0 teacher
    err = _error(capsys, ["train", "--teacher", t, "--data", data, "--output-dir", str(tmp_path / "r"), *FAST])
    assert "prediction_type" in err and "'sample'" in err


@pytest.mark.parametrize("content,msg", [(None, "no metadata.jsonl"), ("", "is empty"),
                                         ('{"file_name": "a.png"}', "no captions"), ("{oops", "not valid JSON")])
def test_bad_dataset_folders(capsys, teacher, tmp_path, content, msg):
    d = tmp_path / "ds"
    d.mkdir()
    if content is not None:
        (d / "metadata.jsonl").write_text(content)
    err = _error(capsys, ["train", "--teacher", teacher, "--data", str(d), "--output-dir", str(tmp_path / "r"), *FAST])
    assert msg in err


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_dataset_of_only_corrupt_images_is_an_error_not_a_hang(source, capsys, teacher, tmp_path):
    pairs = [(b"not an image", f"caption {i}") for i in range(3)]
    if source == "folder":
        data = tmp_path / "ds"
        data.mkdir()
        for i, (payload, text) in enumerate(pairs):
            (data / f"{i}.png").write_bytes(payload)
        (data / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": t})
                                                       for i, (_, t) in enumerate(pairs)))
    else:
        data = _write_shard(tmp_path / "only-corrupt.tar", pairs)
    err = _error(capsys, ["train", "--teacher", teacher, "--data", str(data), "--output-dir", str(tmp_path / "r"), *FAST])
    assert "can be read" in err if source == "folder" else "no readable image" in err


def test_missing_dataset_folder(capsys, teacher, tmp_path):
    err = _error(capsys, ["train", "--teacher", teacher, "--data", str(tmp_path / "none"), "--output-dir",
                          str(tmp_path / "r"), *FAST])
    assert "does not exist" in err


def test_k_not_a_multiple_of_k_phi(capsys, teacher, data, tmp_path):
    err = _error(capsys, ["train", "--teacher", teacher, "--data", data, "--output-dir", str(tmp_path / "r"),
                          "--k", "30", *FAST])
    assert "multiple of k_phi" in err


def test_resume_with_different_config_or_no_run(capsys, teacher, data, tmp_path):
    run = tmp_path / "run"
    _train(teacher, data, run, "--max-steps", "1", "--checkpoint-every", "1", "--validate-every", "0")
    err = _error(capsys, ["train", "--teacher", teacher, "--data", data, "--output-dir", str(run), *FAST,
                          "--w", "8", "--max-steps", "2", "--resume"])
    assert "different settings" in err and "w=3.0" in err
    err = _error(capsys, ["train", "--teacher", teacher, "--data", data, "--output-dir", str(run), *FAST])
    assert "--resume" in err                                         # never overwrite a finished run
    err = _error(capsys, ["train", "--teacher", teacher, "--data", data, "--output-dir", str(tmp_path / "new"),
                          *FAST, "--resume"])
    assert "not a training run" in err


def test_8bit_adam_without_bitsandbytes(capsys, teacher, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    err = _error(capsys, ["train", "--teacher", teacher, "--data", data, "--output-dir", str(tmp_path / "r"),
                          *FAST, "--use-8bit-adam"])
    assert "bitsandbytes" in err


def test_sample_and_export_bad_paths(capsys, tmp_path):
    assert "neither an exported pipeline" in _error(capsys, ["sample", "--model", str(tmp_path), "--prompt", "x"])
    assert "not a training run" in _error(capsys, ["export", "--run", str(tmp_path), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("kind", ["fourier4", "authors"])
def test_gamma_path_is_timestep_cond_and_vanishes_at_one(teacher, kind):
    """The student is the teacher UNet built with diffusers' time_cond_proj_dim; at gamma = 1 its output equals,
    bit for bit, both the teacher's (before training) and the exported UNet's (for any trained weights)."""
    sd = ms.load_sd(teacher)
    student = ms.add_gamma_path(sd.unet, kind)
    assert student.config.time_cond_proj_dim == ms.GAMMA_FEATURES[kind][1]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())    # no hidden state
    assert "register_forward_hook" not in Path(ms.__file__).read_text()
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999, 259]), torch.randn(2, 16, 32)
    eps = ms.unet_eps(student, sd.sched, sd.prediction_type, gamma_kind=kind)
    plain = ms.unet_eps(sd.unet, sd.sched, sd.prediction_type)
    assert torch.equal(eps(x, t, cond, torch.rand(2)), plain(x, t, cond))       # zero cond_proj: the teacher
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight)              # "trained" gamma path
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))                                  # and trained UNet weights
    exported = ms.drop_gamma_path(student)
    assert exported.config.time_cond_proj_dim is None and exported.time_embedding.cond_proj is None
    ex = ms.unet_eps(exported, sd.sched, sd.prediction_type)
    assert torch.equal(eps(x, t, cond, torch.ones(2)), ex(x, t, cond))          # gamma = 1: the exported UNet
    assert not torch.allclose(eps(x, t, cond, torch.zeros(2)), ex(x, t, cond))  # gamma < 1: the path acts


def test_cli_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(Path(ms.__file__)), "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--teacher" in out.stdout and "--resume" in out.stdout


def _torchrun(tmp_path, argv, rank1_setup=""):
    """`torchrun --nproc_per_node=2` on the CLI (gloo on CPU); each rank writes its result to result-<rank>.json.
    `rank1_setup` runs on rank 1 before training (to plant a fault)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(f"import json, os, sys\n"
                      f"sys.path.insert(0, {str(Path(ms.__file__).parent)!r})\n"
                      f"import minisplam as ms\n"
                      f"if os.environ['RANK'] == '1':\n"
                      f"    {rank1_setup or 'pass'}\n"
                      f"res = ms.main(sys.argv[1:])\n"
                      f"with open(f'{tmp_path}/result-{{res[\"rank\"]}}.json', 'w') as f:\n"
                      f"    json.dump(res, f)\n")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), *argv],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_torchrun_two_processes_ddp(source, teacher, data, shards, tmp_path):
    """The multi-GPU path (torchrun + DistributedDataParallel), on CPU with the gloo backend."""
    run = tmp_path / "run"
    out = _torchrun(tmp_path, ["train", "--teacher", teacher, "--data", data if source == "folder" else shards,
                               "--output-dir", str(run), *FAST, "--max-steps", "2", "--checkpoint-every", "2",
                               "--validate-every", "0"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("trained to step 2") == 1                  # rank 0 reports, rank 1 does not
    assert (run / "latest").read_text() == "checkpoint-0000002"
    r0, r1 = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 2     # logged loss = mean over ranks
    assert r0["skipped"] == r1["skipped"] > 0                          # skipped images: summed over ranks
    if source == "webdataset":
        assert r0["skipped"] == 1                  # s1-1 (rank 1's shard) read once in 2 steps, counted on rank 0 too


def test_torchrun_nan_on_one_rank_stops_every_rank(teacher, data, tmp_path):
    run = tmp_path / "run"
    nan_on_2nd_call = ("real = ms.splad_loss; n = []; "
                       "ms.splad_loss = lambda *a, **k: real(*a, **k) * (float('nan') if n.append(1) or len(n) == 2 else 1)")
    out = _torchrun(tmp_path, ["train", "--teacher", teacher, "--data", data, "--output-dir", str(run), *FAST,
                               "--max-steps", "4", "--checkpoint-every", "1", "--validate-every", "0"], nan_on_2nd_call)
    assert out.returncode != 0 and not list(tmp_path.glob("result-*.json"))   # both stopped (and did not hang)
    assert "not finite at step 1" in out.stderr and "checkpoint-0000001" in out.stderr
    assert (run / "latest").read_text() == "checkpoint-0000001"


# --- a user's work is never lost; every bad input refused before models load (issue 9) -----------


@pytest.fixture(scope="module")
def trained_run(teacher, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    _train(teacher, data, run, "--max-steps", "1", "--checkpoint-every", "1", "--validate-every", "0")
    return run


def _tree(root: Path):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


BAD_INPUTS = [  # (argv with {T} teacher, {D} data, {R} trained run, {F} a user's file, {U} a user's folder), message
    (["train", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["train", "--batch-size", "-1"], "--batch-size: must be >= 1"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every: must be >= 1"),
    (["train", "--lr", "-1"], "--lr: must be > 0"),
    (["train", "--lr", "nan"], "--lr: must be a finite number"),
    (["train", "--max-steps", "0"], "--max-steps: must be >= 1"),
    (["train", "--validate-every", "-5"], "--validate-every: must be >= 0"),
    (["train", "--num-workers", "-1"], "--num-workers: must be >= 0"),
    (["train", "--resolution", "15"], "multiple of the VAE factor 2"),
    (["train", "--k", "0"], "--k: must be >= 1"),
    (["train", "--gamma-one-share", "2"], "--gamma-one-share: must be >= 0 and <= 1"),
    (["train", "--huber-c", "0"], "--huber-c: must be > 0"),
    (["train", "--output-dir", "{U}"], "is not empty and is not a minisplam run"),
    (["train", "--output-dir", "{F}"], "is a file"),
    (["sample", "--model", "{R}", "--prompt", "x", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["sample", "--model", "{R}", "--prompt", "x", "--out", "{F}"], "is an existing file"),
    (["sample", "--model", "{R}", "--prompt", "x", "--out", "{U}"], "was not written by `sample`"),
    (["sample", "--model", "{R}", "--prompt", "x", "--resolution", "15"], "multiple of the VAE factor"),
    (["sample", "--model", "{R}"], "at least one --prompt"),
    (["export", "--run", "{R}", "--out", "{U}"], "is not empty"),
    (["export", "--run", "{R}", "--out", "{R}", "--overwrite"], "is the run"),
    (["export", "--run", "{R}", "--out", "{R}/..", "--overwrite"], "contains the run"),
    (["export", "--run", "{R}", "--out", ".", "--overwrite"], "is the current folder"),
    (["export", "--run", "{R}", "--out", "{F}"], "is an existing file"),
]


@pytest.mark.parametrize("argv,msg", [(["{U}"], "is not empty"), (["{T}", "--prediction-type", "sample"],
                                                                      "invalid choice: 'sample'")])
def test_tiny_sd_cli_refuses_with_one_line(argv, msg, tmp_path, capsys):
    """python -m toy.tiny_sd: a non-empty folder or a bad choice is one line, exit 2, and nothing is written."""
    from toy import tiny_sd

    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.txt").write_text("years of work")
    argv = [a.replace("{U}", str(tmp_path / "user")).replace("{T}", str(tmp_path / "t")) for a in argv]
    with pytest.raises(SystemExit) as e:
        tiny_sd.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["thesis.txt", "user"]


@pytest.mark.parametrize("argv,msg", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_changes_no_file(argv, msg, capsys, teacher, data, trained_run, tmp_path,
                                                          monkeypatch):
    user = tmp_path / "user"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "thesis.txt").write_text("years of work")
    (user / "file.txt").write_text("mine")
    monkeypatch.chdir(user)
    fill = {"{T}": str(tmp_path / "t"), "{D}": data, "{R}": str(trained_run), "{F}": str(user / "file.txt"),
            "{U}": str(user / "notes")}
    argv = [fill.get(a, a) for a in argv]
    argv = [a.replace("{R}", str(trained_run)).replace("{T}", str(tmp_path / "t")) for a in argv]
    if argv[0] == "train":
        base = {"--teacher": teacher, "--data": data, "--output-dir": str(tmp_path / "new-run"), "--max-steps": "1",
                "--validate-every": "0"}          # should a bad input slip through, the run still ends at once
        base.update(zip(FAST[::2], FAST[1::2]))
        argv += [x for k, v in base.items() if k not in argv for x in (k, v)]
    before, before_run = _tree(user), _tree(trained_run)
    with pytest.raises(SystemExit) as e:
        ms.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _tree(user) == before and _tree(trained_run) == before_run and not (tmp_path / "new-run").exists()


def test_export_never_deletes_and_overwrite_replaces_atomically(trained_run, tmp_path, capsys):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "dataset.txt").write_text("keep me")
    assert "not empty" in _error(capsys, ["export", "--run", str(trained_run), "--out", str(out)])
    assert (out / "dataset.txt").read_text() == "keep me"
    leftover = ms.own_tmpdir(".tmp-export-pipe-", tmp_path)            # a killed export's temporary folder
    (leftover / "unet.bin").write_text("half-written")
    lookalike = tmp_path.parent / f"{tmp_path.name}-user" / ".tmp-export-pipe-mine"   # a user's, same name pattern
    lookalike.mkdir(parents=True)
    ms.main(["export", "--run", str(trained_run), "--out", str(out), "--overwrite"])
    assert (out / "model_index.json").is_file() and not (out / "dataset.txt").exists()
    assert not list(tmp_path.glob(".tmp-export-*"))                    # cleaned up, never a second copy
    user_dir = lookalike.parent
    ms.main(["export", "--run", str(trained_run), "--out", str(user_dir / "pipe")])
    assert lookalike.is_dir()                                          # not ours: never removed
    empty = tmp_path / "empty"
    empty.mkdir()
    ms.main(["export", "--run", str(trained_run), "--out", str(empty)])  # an empty folder is fine
    assert (empty / "model_index.json").is_file()


def test_mixed_precision_bf16_trains_validates_samples_and_exports(teacher, data, tmp_path):
    run = tmp_path / "run"
    res = _train(teacher, data, run, "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "1",
                 "--mixed-precision", "bf16")
    assert res["step"] == 2 and all(math.isfinite(l) for l in res["losses"])
    assert (run / "validation" / "step-0000002.png").is_file()
    ms.main(["sample", "--model", str(run), "--prompt", "a red square", "--out", str(tmp_path / "s"),
             "--resolution", "16", "--steps", "2"])
    ms.main(["export", "--run", str(run), "--out", str(tmp_path / "e")])
    assert (tmp_path / "s" / "00000.png").is_file() and (tmp_path / "e" / "model_index.json").is_file()


def test_runs_are_portable_and_resume_allows_safe_changes(teacher, data, tmp_path, monkeypatch):
    """Relative paths are stored absolute; `imgs/` and `imgs` are the same data; --lr may change on resume (logged
    and applied); leftovers of a killed checkpoint are removed; a run with no checkpoint yet starts at step 0."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(teacher, work / "teacher")
    shutil.copytree(data, work / "imgs")
    monkeypatch.chdir(work)
    args = ["train", "--teacher", "teacher", "--output-dir", "run", *FAST, "--validate-every", "0",
            "--checkpoint-every", "1"]
    ms.main([*args, "--data", "imgs", "--max-steps", "1"])
    cfg = json.loads((work / "run" / "config.json").read_text())
    assert cfg["teacher"] == str(work / "teacher") and cfg["data"] == str(work / "imgs")
    ms.own_tmpdir(".tmp-checkpoint-", work / "run")                    # a checkpoint killed half-way
    res = ms.main([*args, "--data", "imgs/", "--max-steps", "2", "--lr", "5e-5", "--resume"])
    assert res["step"] == 2 and not list((work / "run").glob(".tmp-*"))
    rows = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"event": "resume", "step": 1, "changed": {"lr": [1e-4, 5e-5], "max_steps": [1, 2]}}
    assert rows[0]["lr"] == 1e-4 and rows[2]["lr"] == 5e-5
    monkeypatch.chdir(tmp_path)                                          # elsewhere: sample and export still work
    ms.main(["sample", "--model", str(work / "run"), "--prompt", "a cat", "--out", "s", "--resolution", "16"])
    ms.main(["export", "--run", str(work / "run"), "--out", "e"])
    (work / "fresh").mkdir()
    (work / "fresh" / "config.json").write_text((work / "run" / "config.json").read_text().replace(
        str(work / "run"), str(work / "fresh")))                          # killed before its first checkpoint
    monkeypatch.chdir(work)
    res = ms.main([*args[:4], "fresh", *args[5:], "--data", "imgs", "--max-steps", "2", "--lr", "5e-5", "--resume"])
    assert res["step"] == 2 and len(res["losses"]) == 2


def test_sample_resumes_with_a_manifest_and_refuses_other_settings(trained_run, tmp_path, capsys):
    out = tmp_path / "gen"
    pf = tmp_path / "p.txt"
    pf.write_text("a red square\na blue square\na green square\n")
    argv = ["sample", "--model", str(trained_run), "--prompts-file", str(pf), "--out", str(out), "--resolution", "16",
            "--batch-size", "2"]
    ms.main(argv)
    rows = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["seed"], r["file"]) for r in rows] == [
        (0, "a red square", 0, "00000.png"), (1, "a blue square", 0, "00001.png"), (2, "a green square", 1, "00002.png")]
    first = (out / "00002.png").read_bytes()
    (out / "00002.png").unlink()                                         # as if killed before the last batch
    mtime = (out / "00000.png").stat().st_mtime_ns
    ms.main(argv)
    assert (out / "00000.png").stat().st_mtime_ns == mtime               # done batches are skipped
    assert (out / "00002.png").read_bytes() == first                     # the missing one is the same image
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3
    assert "other settings" in _error(capsys, [*argv, "--steps", "2"])
    pf.write_text("a cat\n")
    assert "other prompts" in _error(capsys, argv)


def test_help_is_grouped_with_defaults(capsys):
    with pytest.raises(SystemExit):
        ms.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())                   # argparse wraps to the terminal's width
    for group in ("data:", "model:", "SPLAD (Alg. 1):", "optimisation:", "checkpoints and logs:", "hardware:"):
        assert group in out
    assert "(default: 8)" in out and "(default: 0.95)" in out and "(default: authors)" in out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny, randomly initialised CLIP (model + processor) saved locally: CLIP weights cannot be downloaded here."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    tok_dir = Path(make_tiny_sd(str(d / "sd"))) / "tokenizer"
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                          eos_token_id=1, pad_token_id=1),
                         vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=8),
                         projection_dim=8)).save_pretrained(d / "model")
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  CLIPTokenizer.from_pretrained(tok_dir)).save_pretrained(d / "model")
    return str(d / "model")


def _evaluate_main():
    sys.path.insert(0, str(Path(ms.__file__).parent / "benchmarks"))
    import evaluate

    return evaluate.main


def test_evaluate_fid_and_clip_score_offline(trained_run, tiny_clip, tmp_path, capsys):
    """benchmarks/evaluate.py through torchmetrics with small extractors built here: FID of a set against itself is
    ~0; the CLIP score equals 100 max(cos, 0) of the same CLIP on the PNGs as PIL opens them."""
    from transformers import CLIPModel, CLIPProcessor

    main = _evaluate_main()
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    ref.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(ref / f"{i}.png")
    prompts = [f"a {'red blue green cat dog owl'.split()[i]} square" for i in range(6)]
    ms.main(["sample", "--model", str(trained_run), "--out", str(gen), "--resolution", "16",
             *[x for p in prompts for x in ("--prompt", p)]])
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 4), torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()

    class Features(torch.nn.Module):                   # uint8 images in, as torchmetrics' FID passes them
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(torch.nn.functional.interpolate(x.float() / 255, size=16))

    feats = tmp_path / "features.pt"
    torch.jit.script(Features()).save(str(feats))
    base = ["--images", str(gen), "--fid-features", str(feats), "--size", "16"]
    res = main([*base, "--reference", str(ref), "--clip-model", tiny_clip])
    assert res["n_images"] == 6 and res["n_clip"] == 6 and res["fid"] > 0
    assert json.loads((gen / "eval.json").read_text()) == res
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**proc(text=prompts, images=[Image.open(gen / f"{i:05d}.png") for i in range(6)],
                           return_tensors="pt", padding=True))
    want = (100 * torch.cosine_similarity(out.image_embeds, out.text_embeds).clamp(min=0)).mean().item()
    assert res["clip_score"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    same = main(["--images", str(ref), "--reference", str(ref), "--fid-features", str(feats), "--size", "16"])
    assert abs(same["fid"]) < 1e-3 * res["fid"]                                # a set against itself

    def error(argv, msg):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err

    error([*base[:2], "--reference", str(ref), "--inception-weights", str(tmp_path / "none.pth")], "Inception weights")
    error([*base, "--clip-model", "nobody/no-such-clip"], "neither a local folder nor in the Hugging Face cache")
    error(["--images", str(tmp_path / "none"), "--reference", str(ref)], "at least 2 images")
    error(["--images", str(gen), "--size", "0"], "--size: must be >= 1")


# --- guidance and the solver against diffusers' own guided DDIM (issue 22) --------------------------


def sd_step_teacher_solve(teacher_dir, monkeypatch, prompts, k, multiple_estimation, w, size=(24, 20), t=999):
    """One `sd_step` on images of `prompts` (all of `size`), with its timesteps set to t: the latent x_t its teacher
    solve started from, what it returned (x_hat_{t-k}, Eq. 18), the SDXL time ids of the batch and the clean
    latents z = E(x) it distilled on."""
    sd = ms.load_sd(teacher_dir)
    cfg = ms.SPLADConfig(k=k, multiple_estimation=multiple_estimation, w=w)
    student, target = ms.make_student(sd, "cpu", cfg.gamma_features, fp32_unet=sd.unet)
    items = [ms.load_image(io.BytesIO(_png((40 * i, 90, 200 - 40 * i), size)), 16) for i in range(len(prompts))]
    batch = {"pixels": torch.stack([px for px, _ in items]), "time_ids": torch.stack([ids for _, ids in items]),
             "text": prompts}
    calls, real, real_loss, latents = [], ms.teacher_solve, ms.splad_loss, []
    monkeypatch.setattr(ms, "teacher_solve", lambda *a: calls.append((a[1], real(*a))) or calls[-1][1])
    monkeypatch.setattr(ms, "splad_loss", lambda *a: latents.append(a[3]) or real_loss(*a))
    monkeypatch.setattr(ms, "sample_timesteps", lambda B, cfg, g=None, device="cpu": torch.full((B,), t, device=device))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    ms.sd_step(sd, student, student, target, opt, cfg, batch, ms.encode_prompts(sd, [""], "cpu", null=True),
               torch.Generator().manual_seed(0))
    (x_t, x_s), = calls
    return x_t, x_s, batch["time_ids"][0].tolist(), latents[0]


def pipeline_ddim(teacher_dir, prompts, x_t, n_steps, step, w, **kw):
    """diffusers' own pipeline with DDIMScheduler ("trailing": 999, 999 - step, ...) from the latent x_t at t = 999,
    stopped after n_steps steps (callback_on_step_end): the teacher's guided DDIM as SD samples with it."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    pipe.set_progress_bar_config(disable=True)

    def stop(p, i, t, kwargs):
        p._interrupt = i == n_steps - 1
        return kwargs

    return pipe(prompts, latents=x_t.clone(), num_inference_steps=1000 // step, guidance_scale=w, output_type="latent",
                callback_on_step_end=stop, height=16, width=16, **kw).images


@pytest.mark.parametrize("k,me", [(100, True), (100, False), (20, True)], ids=["k100-ME", "k100-one-step", "k20"])
def test_sd_step_teacher_solve_is_diffusers_guided_ddim(teacher, monkeypatch, k, me):
    """sd_step's target point x_hat_{t-k} (guidance w, the null prompt, k/k_phi DDIM steps of multiple estimation)
    equals diffusers' StableDiffusionPipeline with DDIMScheduler run from the same latent and prompts. The error is
    float noise, a thousandth of what guidance itself moves the point: cond/uncond swapped, w ignored or one DDIM
    step too few would be as large as that (tests/planted_bugs.py)."""
    prompts, w, step = ["a red square", "a blue circle"], 8.0, 20 if me else k
    x_t, x_s, _, _ = sd_step_teacher_solve(teacher, monkeypatch, prompts, k, me, w)
    ref = pipeline_ddim(teacher, prompts, x_t, k // step, step, w)
    unguided = pipeline_ddim(teacher, prompts, x_t, k // step, step, 1.0)
    err, effect = (x_s - ref).abs().max().item(), (ref - unguided).abs().max().item()
    print(f"k={k} ME={me}: max |ours - diffusers| = {err:.1e}, guidance moves the point by {effect:.1e}")
    assert err < 1e-3 * effect


def test_sd_step_latents_are_the_pipelines_scaled_vae_latents(teacher, monkeypatch):
    """The clean latents sd_step distils on are z = scaling_factor * E(x), with E(x) as diffusers' img2img pipeline
    encodes an image (VaeImageProcessor, then retrieve_latents with the same generator)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
    from PIL import Image

    _, _, _, z0 = sd_step_teacher_solve(teacher, monkeypatch, ["a", "b"], 20, True, 3.0, size=(16, 16))
    sd = ms.load_sd(teacher)
    images = [Image.open(io.BytesIO(_png((40 * i, 90, 200 - 40 * i), (16, 16)))) for i in range(2)]
    x = VaeImageProcessor(vae_scale_factor=sd.pipe.vae_scale_factor).preprocess(images)
    with torch.no_grad():
        ref = retrieve_latents(sd.pipe.vae.encode(x), torch.Generator().manual_seed(0)) * sd.pipe.vae.config.scaling_factor
    assert sd.pipe.vae.config.scaling_factor != 1 and torch.allclose(z0, ref, atol=1e-5)


# --- which module plays teacher, student and target in a real SD step (issue 31) ---------------------


def _authors_gamma_features(gamma):
    """The UNet's timestep_cond, written out: the authors' index 10 - 10 gamma through LCM's x1000 w embedding
    (256 dims), minus its value at gamma = 1 (Sec. 4.2)."""
    from diffusers.models.embeddings import get_timestep_embedding

    phi = lambda g: get_timestep_embedding(1000 * (10 - 10 * g), 256, flip_sin_to_cos=False, downscale_freq_shift=1)
    return phi(gamma) - phi(torch.ones_like(gamma))


def _unet_as_eps(net):
    """A diffusers UNet called directly, as the eps callables of splad_loss_written_out."""
    return lambda x, t, c, gamma=None: net(x, t, encoder_hidden_states=c, timestep_cond=(
        None if gamma is None else _authors_gamma_features(gamma))).sample


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sd_step_hands_teacher_student_and_target_as_eq17_says(teacher, lora):
    """One sd_step, after two that move the weights away from their start, against an independent composition of
    Eq. 17 (test_core.splad_loss_written_out): the frozen teacher is a separate copy of the teacher's UNet, loaded
    again (a LoRA run's teacher is its student with the adapters off, which must be the same thing), solving with
    diffusers' guided DDIM; the target is the EMA copy (full) or the online student under stop-gradient (LoRA); the
    student sees its gamma through timestep_cond. The draws come from a generator seeded as sd_step's, in its
    order (VAE latents, t, gamma, noise). The loss and the weights after the step (AdamW, clipping, EMA) must match.
    A target that is the online student in a full run, a teacher with its adapters on, a student without its gamma,
    the EMA pair swapped all fail."""
    import copy

    from diffusers import UNet2DConditionModel
    from test_core import splad_loss_written_out

    sd = ms.load_sd(teacher)
    cfg = ms.SPLADConfig(k=40, w=3.0)                                       # two teacher DDIM steps of k_phi = 20
    student, target = ms.make_student(sd, "cpu", cfg.gamma_features, lora_rank=4 if lora else 0)
    frozen = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").requires_grad_(False)
    prompts = ["a red square", "a blue circle"]
    px = torch.stack([ms.load_image(io.BytesIO(_png((40 + 80 * i, 90, 200 - 80 * i), (16, 16))), 16)[0]
                      for i in range(2)])
    batch, uncond1 = {"pixels": px, "text": prompts}, ms.encode_prompts(sd, [""], "cpu", null=True)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    for seed in (0, 1):
        ms.sd_step(sd, student, student, target, opt, cfg, batch, uncond1, torch.Generator().manual_seed(seed))
    named = dict(student.named_parameters())
    assert named["time_embedding.cond_proj.weight"].abs().max() > 1e-4         # the gamma path has trained
    if lora:
        assert target is student and max(p.abs().max() for k, p in named.items() if "lora_B" in k) > 1e-4
    else:
        assert max((a - b).abs().max() for a, b in zip(student.parameters(), target.parameters())) > 1e-4

    ref_s = copy.deepcopy(student)
    ref_t = ref_s if lora else copy.deepcopy(target)
    ref_opt = torch.optim.AdamW([p for p in ref_s.parameters() if p.requires_grad], lr=1e-3)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = [p.detach().clone() for p in student.parameters()]
    loss = ms.sd_step(sd, student, student, target, opt, cfg, batch, uncond1, torch.Generator().manual_seed(2))

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        z0 = sd.pipe.vae.encode(px).latent_dist.sample(g) * sd.pipe.vae.config.scaling_factor
        cond = sd.pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    t, gamma = ms.sample_timesteps(2, cfg, g), ms.sample_gamma(2, cfg, g)
    noise = torch.randn(z0.shape, generator=g)
    assert (gamma < 1).any() and (t >= cfg.k).any()       # the gamma path acts in this step, away from t = 0
    ref_loss = splad_loss_written_out(_unet_as_eps(ref_s), _unet_as_eps(ref_t), _unet_as_eps(frozen), z0, cond,
                                      uncond1.expand_as(cond), t, gamma, noise, cfg)
    ref_opt.zero_grad()
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in ref_s.parameters() if p.requires_grad], 10.0)   # Appendix A
    ref_opt.step()
    if not lora:
        with torch.no_grad():
            for p_t, p in zip(ref_t.parameters(), ref_s.parameters()):
                p_t.mul_(cfg.ema_mu).add_((1 - cfg.ema_mu) * p)                # Alg. 1, last line
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0), (loss.item(), ref_loss.item())
    mods = [(student, ref_s)] + ([] if lora else [(target, ref_t)])
    diff = max((a - b).abs().max().item() for m, r in mods for a, b in zip(m.parameters(), r.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(student.parameters(), before))
    print(f"{'LoRA' if lora else 'full'}: loss {loss.item():.6g} vs {ref_loss.item():.6g}; the step moves the "
          f"weights by up to {moved:.1e}, the two differ by {diff:.1e}")
    assert diff < 1e-2 * moved


def test_train_hands_sd_step_the_default_config_and_optimizer(teacher, data, tmp_path, monkeypatch):
    """`train` with every method and optimisation option at its default hands sd_step SPLADConfig() and the
    table's values (test_core.DEFAULTS: Appendix A, LCM's script or a documented departure): AdamW over exactly the
    student's trainable weights with the table's lr, betas, eps and weight decay, clipping at max_grad_norm, images
    at the default resolution, the EMA target a separate copy of the student."""
    from test_core import DEFAULTS

    class Stop(Exception):
        pass

    seen = {}

    def first_step(sd, online, student, target, opt, cfg, batch, uncond1, generator, low_dtype, max_grad_norm):
        seen.update(student=student, target=target, opt=opt, cfg=cfg, batch=batch, max_grad_norm=max_grad_norm)
        raise Stop

    monkeypatch.setattr(ms, "sd_step", first_step)
    with pytest.raises(Stop):
        ms.main(["train", "--teacher", teacher, "--data", data, "--output-dir", str(tmp_path / "r"),
                 "--num-workers", "0"])
    cfg, opt, student = seen["cfg"], seen["opt"], seen["student"]
    assert cfg == ms.SPLADConfig() and all(getattr(cfg, k) == DEFAULTS[k][0] for k in vars(cfg))
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    assert {k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")} == {
        "lr": DEFAULTS["lr"][0], "betas": DEFAULTS["adamw_betas"][0], "eps": DEFAULTS["adamw_eps"][0],
        "weight_decay": DEFAULTS["weight_decay"][0], "amsgrad": False}
    params = opt.param_groups[0]["params"]
    assert len(params) == len(list(student.parameters()))
    assert all(a is b for a, b in zip(params, student.parameters()))               # the full UNet and the gamma path
    assert seen["max_grad_norm"] == DEFAULTS["max_grad_norm"][0]
    assert seen["batch"]["pixels"].shape[-2:] == (DEFAULTS["resolution"][0],) * 2
    assert seen["target"] is not student and not any(p.requires_grad for p in seen["target"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(seen["target"].parameters(), student.parameters()))
