"""Nothing a user runs can destroy a run or end in a traceback (issue 21).

`test_every_option_of_every_entry_point` walks the argparse actions of `minisplam.py train | sample | export`,
`python -m toy.tiny_sd` and `benchmarks/evaluate.py`, and gives every option each value a user can mistype. Every
call must succeed or print one `error:` line with exit code 2, and no file outside the call's own new output may
change. The tests after it each reproduce one reported failure (issue 21, items 1-9).
"""

import hashlib
import inspect
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import minisplam as ms
from test_sd import FAST, _error, _png, _write_shard, tiny_clip  # noqa: F401  (tiny_clip: a fixture)
from toy import tiny_sd

ROOT = Path(ms.__file__).resolve().parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import evaluate  # noqa: E402

HUGE = "99999999999999999999"
VALUES = ["0", "-1", "nan", "inf", "", HUGE, "abc", "{missing}", "{file}", "{folder}", "{inrun}"]


_SHA = {}


def _tree(root: Path) -> dict:
    """Every file under root -> (size, mtime, sha1): a checksum of the whole tree. The sha1 is recomputed whenever
    the file's inode, size, mtime or ctime changed (any write changes the ctime)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key not in _SHA:
                _SHA[key] = hashlib.sha1(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, _SHA[key])
    return out


def _features(path: Path) -> str:
    """A tiny TorchScript feature extractor (uint8 images -> features), as FID takes one: no Inception weights here."""
    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 4), torch.nn.Flatten(), torch.nn.Linear(64, 4))

        def forward(self, x):
            return self.net(torch.nn.functional.interpolate(x.float() / 255, size=16))

    torch.jit.script(Features().eval()).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    """One tmp tree holding a user's files, a tiny teacher, its data, one finished tiny run, an export of it, a sample
    folder and evaluation inputs: everything the walk reads and must leave as it was."""
    root = tmp_path_factory.mktemp("world")
    (root / "user" / "notes").mkdir(parents=True)
    (root / "user" / "notes" / "thesis.txt").write_text("years of work")
    (root / "user" / "file.txt").write_text("mine")
    teacher = tiny_sd.make_tiny_sd(str(root / "teacher"))
    data = root / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (data / f"{i}.png").write_bytes(_png(colour, (16, 16)))
        rows.append(json.dumps({"file_name": f"{i}.png", "text": ["a red square", "a blue square"][i]}))
    (data / "metadata.jsonl").write_text("\n".join(rows))
    run = root / "run"
    ms.main(["train", "--teacher", teacher, "--data", str(data), "--output-dir", str(run), "--k", "20", *FAST,
             "--batch-size", "1", "--max-steps", "1", "--validate-every", "0"])
    ms.main(["export", "--run", str(run), "--out", str(root / "pipeline")])
    gen = root / "gen"
    ms.main(["sample", "--model", str(run), "--prompt", "a red square", "--prompt", "a blue square", "--out", str(gen)])
    ref = root / "ref"
    ref.mkdir()
    for i in range(3):
        (ref / f"{i}.png").write_bytes(_png((60 * i, 90, 30), (16, 16)))
    return {"root": root, "teacher": teacher, "data": str(data), "run": str(run), "pipeline": str(root / "pipeline"),
            "gen": str(gen), "ref": str(ref), "features": _features(root / "features.pt"), "clip": tiny_clip}


def parsers():
    """The parser of each entry point, whose options the walk visits."""
    subs = ms.build_parser()._subparsers._group_actions[0].choices
    return {"train": subs["train"], "sample": subs["sample"], "export": subs["export"],
            "toy.tiny_sd": tiny_sd.build_parser(), "evaluate.py": evaluate.build_parser()}


def entry_points(w, new):
    """name -> (base argv that succeeds, run(argv)), `new` a fresh output path for this call."""
    train = ["train", "--teacher", w["teacher"], "--data", w["data"], "--output-dir", new, "--k", "20", *FAST,
             "--batch-size", "1", "--max-steps", "1", "--validate-every", "0"]
    return {
        "train": (train, ms.main),
        "sample": (["sample", "--model", w["run"], "--prompt", "a red square", "--out", new], ms.main),
        "export": (["export", "--run", w["run"], "--out", new], ms.main),
        "toy.tiny_sd": ([new], tiny_sd.main),
        "evaluate.py": (["--images", w["gen"], "--reference", w["ref"], "--fid-features", w["features"], "--size", "16",
                         "--clip-model", w["clip"]], evaluate.main),
    }


def with_option(base, action, value):
    """base with `action` set to value (replacing its value in base, or appended); a flag is just added."""
    argv = list(base)
    if not action.option_strings:                                   # the positional output folder
        return [value] + argv[1:]
    opt = action.option_strings[-1]
    if action.nargs == 0:
        return argv + [opt]
    if opt in argv:
        i = argv.index(opt)
        return argv[:i + 1] + [value] + argv[i + 2:]
    return argv + [opt, value]


def test_every_option_of_every_entry_point(world, tmp_path, capsys, monkeypatch):
    root = world["root"]
    monkeypatch.chdir(root / "user")                                # relative paths land in a user's folder
    fill = {"{missing}": str(root / "missing" / "x"), "{file}": str(root / "user" / "file.txt"),
            "{folder}": str(root / "user" / "notes"), "{inrun}": str(Path(world["run"]) / "checkpoint-0000001")}
    tried, outcomes, n, problems = 0, {"ok": 0, "error": 0, "traceback": 0}, 0, []
    for name, parser in parsers().items():
        for action in parser._actions:
            if action.dest in ("help",):
                continue
            for raw in (["(flag)"] if action.nargs == 0 else VALUES):
                n += 1
                new = str(tmp_path / f"new-{n}")
                base, run = entry_points(world, new)[name]
                value = fill.get(raw, raw)
                argv = with_option(base, action, value)
                own = [p for p in (Path(new), root / "user" / value, root / "missing") if value and not p.exists()]
                before = _tree(root)
                capsys.readouterr()
                try:
                    run(argv)
                    outcome = "ok"
                except SystemExit as e:
                    err = capsys.readouterr().err
                    lines = [l for l in err.strip().splitlines() if l.strip()]
                    outcome = "error"
                    if not (e.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")):
                        problems.append((name, argv, f"exit {e.code}", err[-300:]))
                except Exception as e:                                        # a traceback
                    problems.append((name, argv, "traceback", f"{type(e).__name__}: {str(e)[:200]}"))
                    outcome = "traceback"
                after = _tree(root)
                changed = [f for f in set(before) | set(after) if before.get(f) != after.get(f)
                           and not any(p == root / f or p in (root / f).parents for p in own)
                           and f != str(Path("gen") / "eval.json")]           # evaluate.py's own output
                if changed:
                    problems.append((name, argv, "changed files", changed))
                for p in own:                                                 # what this call created goes again
                    if p.is_dir():
                        shutil.rmtree(p)
                tried += 1
                outcomes[outcome] += 1
    print(f"option walk: {tried} calls (options x values over 5 entry points), {outcomes['ok']} succeeded, "
          f"{outcomes['error']} refused with one error line, 0 tracebacks, 0 files changed")
    assert not problems, "\n".join(map(str, problems))
    assert tried > 400


# --- issue 21, items 1-9: each reproduced, each failed before its fix ------------------------------------------------

def _refused(capsys, run, argv, msg):
    """run(argv) ends in exactly one `error:` line containing msg, exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(argv)
    err = capsys.readouterr().err
    lines = [l.split("\r")[-1] for l in err.strip().split("\n")]             # as a terminal shows it: \r overwrites
    lines = [l for l in lines if l.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and msg in err, err
    return err


@pytest.mark.parametrize("target", ["run/checkpoint-0000001", "run/validation", "run/latest", "teacher", "data",
                                    "teacher/unet", "."])
@pytest.mark.parametrize("cmd", ["export", "sample"])
def test_1_overwrite_never_touches_the_run_its_teacher_its_data_or_the_current_folder(world, cmd, target, capsys,
                                                                                        monkeypatch):
    root = world["root"]
    monkeypatch.chdir(root)
    before = _tree(root)
    argv = (["export", "--run", world["run"], "--out", target, "--overwrite"] if cmd == "export" else
            ["sample", "--model", world["run"], "--prompt", "x", "--out", target])
    _refused(capsys, ms.main, argv, "--out")
    assert _tree(root) == before
    ms.main(["sample", "--model", world["run"], "--prompt", "a red square", "--out", str(root / "again")])
    shutil.rmtree(root / "again")                                   # the run still samples


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_2_lora_with_mixed_precision_writes_validation_grids(world, precision, tmp_path):
    ms.main(["train", "--teacher", world["teacher"], "--data", world["data"], "--output-dir", str(tmp_path / "r"),
             *FAST, "--batch-size", "1", "--lora-rank", "4", "--mixed-precision", precision, "--max-steps", "1",
             "--validate-every", "1"])
    assert (tmp_path / "r" / "validation" / "step-0000001.png").is_file()


@pytest.mark.parametrize("bad,msg", [(["--fid-features", "{missing}"], "--fid-features"),
                                     (["--fid-features", "{png}"], "--fid-features"),
                                     (["--clip-model", "{notclip}"], "--clip-model")])
def test_3_evaluate_refuses_bad_feature_and_clip_paths_before_any_work(world, bad, msg, capsys, monkeypatch):
    notclip = world["root"] / "user" / "notes"
    fill = {"{missing}": str(world["root"] / "nope.pt"), "{png}": str(Path(world["ref"]) / "0.png"),
            "{notclip}": str(notclip)}
    argv = ["--images", world["gen"], "--reference", world["ref"], "--fid-features", world["features"], "--size", "16",
            "--clip-model", world["clip"]]
    i = argv.index(bad[0])
    argv[i + 1] = fill[bad[1]]
    monkeypatch.setattr(evaluate, "read_image", lambda *a: pytest.fail("image work started before the checks"))
    _refused(capsys, evaluate.main, argv, msg)


def test_4_webdataset_image_without_adjacent_caption_with_two_workers_is_one_line(world, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):                                                 # a.png b.png a.txt b.txt: pairs not adjacent
        with tarfile.open(shards / f"{s}.tar", "w") as tf:
            for name, payload in [("a.png", _png((200, 0, 0), (16, 16))), ("b.png", _png((0, 0, 200), (16, 16))),
                                  ("a.txt", b"a red square"), ("b.txt", b"a blue square")]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    err = _refused(capsys, ms.main, ["train", "--teacher", world["teacher"], "--data", str(shards / "{0..1}.tar"), "--output-dir",
                                     str(tmp_path / "r"), *FAST, "--num-workers", "2", "--max-steps", "1",
                                     "--validate-every", "0"], "caption")
    assert "unreadable" not in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_5_a_metadata_line_that_is_a_list_is_one_line(world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "metadata.jsonl").write_text('["0.png", "a red square"]\n')
    _refused(capsys, ms.main, ["train", "--teacher", world["teacher"], "--data", str(data), "--output-dir",
                               str(tmp_path / "r"), *FAST, "--max-steps", "1"], "metadata.jsonl")


@pytest.mark.parametrize("opt", ["--w", "--lr", "--huber-c", "--ema-mu", "--gamma-one-share", "--lora-alpha",
                                 "--weight-decay", "--max-grad-norm"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_6_every_float_option_refuses_nan_and_inf(world, opt, value, tmp_path, capsys):
    _refused(capsys, ms.main, ["train", "--teacher", world["teacher"], "--data", world["data"], "--output-dir",
                               str(tmp_path / "r"), f"{opt}={value}"], f"{opt}: must be a finite number")


def test_7_a_run_that_failed_before_its_first_step_can_be_run_again_as_it_was(world, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "0.png").write_bytes(b"not an image")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}))
    argv = ["train", "--teacher", world["teacher"], "--data", str(data), "--output-dir", str(tmp_path / "r"), *FAST,
            "--max-steps", "1", "--validate-every", "0"]
    for _ in range(2):                                              # the same error twice: nothing blocks the retry
        _refused(capsys, ms.main, argv, "none of the images")
        assert not (tmp_path / "r").exists()
    (tmp_path / "mine").mkdir()                                     # a folder the user made stays, empty as it was
    _refused(capsys, ms.main, argv[:6] + [str(tmp_path / "mine")] + argv[7:], "none of the images")
    assert list((tmp_path / "mine").iterdir()) == []


def test_8_outputs_follow_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        ms.main(["train", "--teacher", world["teacher"], "--data", world["data"], "--output-dir", str(tmp_path / "r"),
                 *FAST, "--batch-size", "1", "--lora-rank", "4", "--max-steps", "1", "--validate-every", "0"])
        ms.main(["export", "--run", str(tmp_path / "r"), "--out", str(tmp_path / "lora")])
        ms.main(["export", "--run", world["run"], "--out", str(tmp_path / "pipe")])
    finally:
        os.umask(old)
    for d in [tmp_path / "r", tmp_path / "r" / "checkpoint-0000001", tmp_path / "lora", tmp_path / "pipe",
              tmp_path / "pipe" / "unet"]:
        assert d.stat().st_mode & 0o777 == 0o755, d
    for f in [tmp_path / "lora" / "pytorch_lora_weights.safetensors", tmp_path / "pipe" / "model_index.json"]:
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_9_resume_messages_and_max_steps(world, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(world["run"], run)
    argv = ["train", "--teacher", world["teacher"], "--data", world["data"], "--output-dir", str(run), "--k", "20",
            *FAST, "--batch-size", "1", "--validate-every", "0", "--resume"]
    config = (run / "config.json").read_text()
    capsys.readouterr()
    ms.main(argv + ["--max-steps", "1"])                            # finished: says so, never "None"
    out = capsys.readouterr()
    assert "already at step 1" in out.err and "None" not in out.out + out.err
    (run / "checkpoint-0000001").rename(run / "checkpoint-0000002")  # pretend it is at step 2, then ask for 1
    state = json.loads((run / "checkpoint-0000002" / "state.json").read_text())
    (run / "checkpoint-0000002" / "state.json").write_text(json.dumps({**state, "step": 2}))
    (run / "latest").write_text("checkpoint-0000002")
    _refused(capsys, ms.main, argv + ["--max-steps", "1"], "--max-steps")
    assert (run / "config.json").read_text() == config


def test_9_sample_more_than_64_prompts_writes_the_grid_of_the_first_64(world, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(70)))
    ms.main(["sample", "--model", world["pipeline"], "--prompts-file", str(prompts), "--batch-size", "35", "--steps", "1",
             "--out", str(tmp_path / "s")])
    assert "wrote 70 images, manifest.jsonl and grid.png (the first 64)" in capsys.readouterr().out
    assert Image.open(tmp_path / "s" / "grid.png").size == (8 * 16, 8 * 16)


def test_9_exported_scheduler_config_is_lcms_own(world):
    from diffusers import LCMScheduler

    config = json.loads((Path(world["pipeline"]) / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler" and "variance_type" not in config
    assert set(config) - {"_class_name", "_diffusers_version"} <= set(inspect.signature(LCMScheduler).parameters)


def test_9_help_says_what_to_do(capsys):
    with pytest.raises(SystemExit) as e:
        ms.main([])
    assert e.value.code == 2 and "choose a command: train, sample or export" in capsys.readouterr().err
    for cmd in ("train", "sample", "export"):
        with pytest.raises(SystemExit):
            ms.main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    n = [a for a in ms.build_parser()._subparsers._group_actions[0].choices["train"]._actions
         if a.dest == "num_workers"][0].default
    assert 0 <= n <= (os.cpu_count() or 1)


def test_9_an_unreachable_hub_id_fails_at_once(world, tmp_path, capsys, monkeypatch):
    import socket
    import time

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.time()
    _refused(capsys, ms.main, ["train", "--teacher", "some-org/some-model", "--data", world["data"], "--output-dir",
                               str(tmp_path / "r")], "some-org/some-model")
    assert time.time() - t0 < 20 and not (tmp_path / "r").exists()  # no retries (they took ~30 s)


def test_9_a_normal_run_prints_only_our_own_lines(world, tmp_path):
    """A subprocess, as a user runs it: no library warnings or their progress bars, and --verbose brings them back."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    run = lambda *argv: subprocess.Popen([sys.executable, str(ROOT / "minisplam.py"), *argv], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    export = run("export", "--run", world["run"], "--out", str(tmp_path / "p"))       # both at once: one per core
    sample = run("sample", "--model", world["run"], "--prompt", "x", "--out", str(tmp_path / "s"))
    verbose = run("sample", "--model", world["run"], "--prompt", "x", "--out", str(tmp_path / "v"), "--verbose")
    (out, err), (_, sample_err), (_, verbose_err) = export.communicate(), sample.communicate(), verbose.communicate()
    assert export.returncode == 0 and err.strip() == "", err
    assert out.strip().splitlines() == [f"exported to {tmp_path / 'p'}"], out
    assert sample.returncode == 0, sample_err
    noise = [l for l in sample_err.splitlines() if re.search(r"warn|Loading pipeline|Writing model|deprecat", l, re.I)]
    assert noise == [], noise
    assert verbose.returncode == 0 and "Loading pipeline components" in verbose_err, verbose_err   # --verbose: back
