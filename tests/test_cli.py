"""Nothing a user runs can destroy a run or end in a traceback (issue 21).

`test_every_option_of_every_entry_point` walks the argparse actions of `minisplam.py train | sample | export`,
`python -m toy.tiny_sd` and `benchmarks/evaluate.py`, and gives every option each value a user can mistype (a path
option also the paths of PATH_VALUES). Every call must succeed or print one `error:` line with exit code 2, and no file
outside the call's own new output may change. The tests after it each reproduce one reported failure (issue 21,
items 1-9; issue 31, items 1-18).
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
# issue 31: a read-only folder, a symlink loop, a file where a folder is expected (metadata.jsonl), a mount point, and
# a data folder whose metadata.jsonl has a non-string file_name
PATH_VALUES = ["{readonly}", "{loop}", "{metafile}", "{mount}", "{badmeta}"]


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


def _readonly_and_mounts(monkeypatch, readonly: Path, is_mount):
    """Simulate a read-only mount at `readonly` (root writes anywhere else; os.access is how the OS tells) and mount
    points where is_mount(path)."""
    access, ismount = os.access, os.path.ismount
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and (
        Path(p) == readonly or readonly in Path(p).parents) else access(p, mode, *a, **k))
    monkeypatch.setattr(os.path, "ismount", lambda p: is_mount(Path(p)) or ismount(p))


def test_every_option_of_every_entry_point(world, tmp_path, capsys, monkeypatch):
    root = world["root"]
    monkeypatch.chdir(root / "user")                                # relative paths land in a user's folder
    (root / "ro").mkdir(exist_ok=True)
    (tmp_path / "loop").symlink_to("loop")
    shutil.copytree(world["data"], root / "badmeta", dirs_exist_ok=True)
    (root / "badmeta" / "metadata.jsonl").write_text('{"file_name": 5, "text": "a red square"}\n')
    _readonly_and_mounts(monkeypatch, root / "ro", lambda p: p.parent == tmp_path and p.name.startswith("mnt-"))
    fill = {"{missing}": str(root / "missing" / "x"), "{file}": str(root / "user" / "file.txt"),
            "{folder}": str(root / "user" / "notes"), "{inrun}": str(Path(world["run"]) / "checkpoint-0000001"),
            "{readonly}": str(root / "ro"), "{loop}": str(tmp_path / "loop"),
            "{metafile}": str(Path(world["data"]) / "metadata.jsonl"), "{badmeta}": str(root / "badmeta")}
    tried, outcomes, n, problems = 0, {"ok": 0, "error": 0, "traceback": 0}, 0, []
    for name, parser in parsers().items():
        for action in parser._actions:
            if action.dest in ("help",):
                continue
            for raw in (["(flag)"] if action.nargs == 0 else VALUES + PATH_VALUES * (action.type is ms.path_arg)):
                n += 1
                new = str(tmp_path / f"new-{n}")
                base, run = entry_points(world, new)[name]
                fill["{mount}"] = str(tmp_path / f"mnt-{n}")                  # a fresh, empty mount point
                Path(fill["{mount}"]).mkdir()
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
                for p in own + [Path(fill["{mount}"])]:                       # what this call created goes again
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
        tiny_sd.main([str(tmp_path / "tiny")])                      # issue 31 item 14: its weights were 0600
    finally:
        os.umask(old)
    for d in [tmp_path / "r", tmp_path / "r" / "checkpoint-0000001", tmp_path / "lora", tmp_path / "pipe",
              tmp_path / "pipe" / "unet", *(p for p in (tmp_path / "tiny").rglob("*") if p.is_dir())]:
        assert d.stat().st_mode & 0o777 == 0o755, d
    for f in [tmp_path / "lora" / "pytorch_lora_weights.safetensors", tmp_path / "pipe" / "model_index.json",
              *(p for p in (tmp_path / "tiny").rglob("*") if p.is_file())]:
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
    train = ms.build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: train._get_formatter()._expand_help(a) for a in train._actions if a.help}
    assert helps["weight_decay"].endswith("(default: 0.0)") and helps["seed"].endswith("(default: 0)")   # issue 31
    assert helps["num_workers"].count("default") == 1                                                     # item 17
    assert 0 <= [a for a in train._actions if a.dest == "num_workers"][0].default <= (os.cpu_count() or 1)


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


# --- issue 31, items 1-18: each reproduced, each failed before its fix ----------------------------------------------

def _train_argv(w, out, *extra):
    return ["train", "--teacher", w["teacher"], "--data", w["data"], "--output-dir", str(out), "--k", "20", *FAST,
            "--batch-size", "1", "--validate-every", "0", *extra]


def _copy_run(w, dst: Path, teacher=None) -> Path:
    """The world's run, copied to dst (its config pointing at dst, and at `teacher` if given)."""
    shutil.copytree(w["run"], dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "output_dir": str(dst), "teacher": teacher or w["teacher"]}))
    return dst


def _no_model_loads(monkeypatch):
    monkeypatch.setattr(ms, "load_sd", lambda *a, **k: pytest.fail("a model loaded before the refusal"))


def test_31_1_2_a_folder_in_use_is_refused_and_a_killed_holder_never_blocks(world, tmp_path, capsys):
    """Issue 31 items 1-2: a second train (new or --resume), export or sample on a folder another process holds is
    refused in one line, before it touches anything; after a kill -9 of the holder the next command just runs."""
    run = _copy_run(world, tmp_path / "run")
    folders = [tmp_path / "new-run", run, tmp_path / "pipe", tmp_path / "gen"]
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"     # as hold_output takes it
                               "for d in sys.argv[1:]:\n"
                               "    os.makedirs(d, exist_ok=True)\n"
                               f"    f = open(os.path.join(d, {ms.LOCK_FILE!r}), 'a+')\n"
                               "    fcntl.lockf(f, fcntl.LOCK_EX)\n"
                               "    f.write(str(os.getpid()))\n"
                               "    f.flush()\n"
                               "    globals()[d] = f\n"
                               "print('held', flush=True)\n"
                               "time.sleep(120)", *map(str, folders)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(tmp_path)
        for argv in [_train_argv(world, folders[0], "--max-steps", "1"),
                     _train_argv(world, run, "--max-steps", "2", "--resume"),
                     ["export", "--run", str(run), "--out", str(folders[2])],
                     ["sample", "--model", str(run), "--prompt", "a red square", "--out", str(folders[3])]]:
            _refused(capsys, ms.main, argv, f"is in use by process {holder.pid}")
        assert _tree(tmp_path) == before                             # nothing written, the holder's lock untouched
    finally:
        holder.kill()                                                # kill -9: the OS drops its locks
        holder.wait()
    ms.main(["export", "--run", str(run), "--out", str(folders[2])])
    ms.main(["sample", "--model", str(run), "--prompt", "a red square", "--out", str(folders[3])])
    assert (folders[2] / "model_index.json").is_file() and (folders[3] / "00000.png").is_file()
    assert not (folders[2] / ms.LOCK_FILE).exists() and not (folders[3] / ms.LOCK_FILE).exists()


def _bomb_png() -> bytes:
    """A 1-pixel PNG whose header says 20000 x 20000: PIL's decompression bomb check refuses it on open."""
    import struct
    import zlib

    png = bytearray(_png((0, 0, 0), (1, 1)))
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_31_3_a_decompression_bomb_is_skipped_and_named(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "bomb.png", "text": "a huge image"}))
    item = ms.ImageCaptionFolder(tmp_path, 16)[(0, 0)]
    assert item["pixels"] is None and item["why"] == "an unreadable image"
    assert ms.collate_skip_corrupt([item])["skipped_files"] == [f"{tmp_path / 'bomb.png'} (an unreadable image)"]


def _one_error_line(capsys, run, argv, code):
    """run(argv) ends in exactly one `error:` line (as a terminal shows it) and exit code `code`; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(argv)
    lines = [l.split("\r")[-1] for l in capsys.readouterr().err.strip().split("\n")]
    lines = [l for l in lines if l.strip()]
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_31_4_a_full_disk_is_one_line_and_leaves_nothing_half_written(world, tmp_path, capsys, monkeypatch):
    """A full disk, simulated by the errors its writers raise (measured on a full tmpfs): torch.save's RuntimeError,
    safetensors' SafetensorError and an OSError ENOSPC."""
    import errno

    import diffusers
    from safetensors import SafetensorError

    run = _copy_run(world, tmp_path / "run")                        # the checkpoint write of a resumed run
    def torn(obj, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", torn)
        err = _one_error_line(capsys, ms.main, _train_argv(world, run, "--max-steps", "2", "--resume"), 1)
    assert "could not write checkpoint-0000002" in err and "checkpoint-0000001, is intact" in err and "--resume" in err
    assert not list(run.glob(".tmp-*")) and (run / "latest").read_text() == "checkpoint-0000001"

    def full(self, path, *a, **k):                                  # export: the first weights half-written
        (Path(path) / "unet").mkdir(parents=True)
        (Path(path) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "save_pretrained", full)
    err = _one_error_line(capsys, ms.main, ["export", "--run", world["run"], "--out", str(tmp_path / "pipe")], 1)
    assert "could not export" in err and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]   # no .tmp-export-*, no --out

    write_text = Path.write_text                                     # a disk already full: the first small write
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")) if ".json.tmp" in self.name else write_text(self, *a, **k))
    for argv in [_train_argv(world, tmp_path / "new-run", "--max-steps", "1"),
                 ["sample", "--model", world["run"], "--prompt", "a red square", "--out", str(tmp_path / "gen")]]:
        assert "No space left on device" in _one_error_line(capsys, ms.main, argv, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]   # nothing left: the same command runs again


def test_31_5_a_read_only_output_is_refused_before_models_load(world, tmp_path, capsys, monkeypatch):
    """A read-only mount, simulated: os.access says so (as the OS does for a read-only mount, even for root)."""
    ro = tmp_path / "ro"
    run = _copy_run(world, ro / "run")
    (ro / "pipe").mkdir()
    (ro / "pipe" / "old.txt").write_text("an older export")
    _readonly_and_mounts(monkeypatch, ro, lambda p: False)
    _no_model_loads(monkeypatch)
    before = _tree(tmp_path)
    for argv in [["export", "--run", world["run"], "--out", str(ro / "new")],
                 ["export", "--run", world["run"], "--out", str(ro / "pipe"), "--overwrite"],
                 ["sample", "--model", world["run"], "--prompt", "x", "--out", str(ro / "gen")],
                 _train_argv(world, ro / "new-run", "--max-steps", "1"),
                 _train_argv(world, run, "--max-steps", "2", "--resume")]:
        _refused(capsys, ms.main, argv, "cannot be written")
    assert _tree(tmp_path) == before and sorted(p.name for p in ro.iterdir()) == ["pipe", "run"]


def test_31_6_export_to_a_mount_point_is_refused_before_models_load(world, tmp_path, capsys, monkeypatch):
    (tmp_path / "mnt").mkdir()
    _readonly_and_mounts(monkeypatch, tmp_path / "ro", lambda p: p == tmp_path / "mnt")
    _no_model_loads(monkeypatch)
    _refused(capsys, ms.main, ["export", "--run", world["run"], "--out", str(tmp_path / "mnt")], "is a mount point")
    assert [p.name for p in tmp_path.iterdir()] == ["mnt"] and not any((tmp_path / "mnt").iterdir())


@pytest.mark.parametrize("option", ["--data", "--output-dir", "--teacher", "export --out", "sample --out",
                                    "sample --model"])
def test_31_7_a_symlink_loop_is_one_line(world, option, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    argv = {"export --out": ["export", "--run", world["run"], "--out", str(loop)],
            "sample --out": ["sample", "--model", world["run"], "--prompt", "x", "--out", str(loop)],
            "sample --model": ["sample", "--model", str(loop), "--prompt", "x", "--out", str(tmp_path / "s")]}.get(
        option) or _train_argv(world, tmp_path / "r", "--max-steps", "1")
    if option.startswith("--"):
        argv[argv.index(option) + 1] = str(loop)
    _refused(capsys, ms.main, argv, "is a symlink loop")


@pytest.mark.parametrize("content,msg", [(b'{"file_name": "0.png", "text": "caf\xe9"}\n', "metadata.jsonl:1 is not valid JSON ('utf-8' codec"),
                                         (b'{"file_name": 5, "text": "a red square"}\n', "file_name is a string"),
                                         (b'{"file_name": ["0.png"], "text": "a red square"}\n', "file_name is a string"),
                                         (None, "is a file: give the folder")])
def test_31_8_metadata_lines_are_checked_before_models_load(world, content, msg, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    if content:
        (data / "metadata.jsonl").write_bytes(content)
    _no_model_loads(monkeypatch)
    argv = _train_argv(world, tmp_path / "r", "--max-steps", "1")
    argv[argv.index("--data") + 1] = str(data if content else data / "metadata.jsonl")
    _refused(capsys, ms.main, argv, msg)
    assert not (tmp_path / "r").exists()


def test_31_8_a_metadata_bom_is_read(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + (data / "metadata.jsonl").read_bytes())
    assert ms.ImageCaptionFolder(data, 16).items == [("0.png", "a red square"), ("1.png", "a blue square")]


def _as_script(monkeypatch, argv):
    """`python minisplam.py ARGV` in this process (its __main__ block included): its exit code."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["minisplam.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "minisplam.py"), run_name="__main__")
    return e.value.code


@pytest.mark.parametrize("cmd", ["train", "sample", "export"])
def test_31_9_ctrl_c_is_one_line_exit_130_and_removes_temporary_files(world, cmd, tmp_path, capsys, monkeypatch):
    import diffusers
    import diffusers.utils
    import safetensors.torch

    def ctrl_c(*a, **k):                               # mid-write: a temporary file or folder exists by now
        if cmd == "export":
            (Path(a[1]) / "half.bin").write_bytes(b"half")
        raise KeyboardInterrupt
    where = {"train": (safetensors.torch, "save_model"), "sample": (diffusers.utils, "numpy_to_pil"),
             "export": (diffusers.DiffusionPipeline, "save_pretrained")}[cmd]
    monkeypatch.setattr(*where, ctrl_c)
    argv = {"train": _train_argv(world, tmp_path / "out", "--max-steps", "1"),
            "sample": ["sample", "--model", world["run"], "--prompt", "x", "--out", str(tmp_path / "out")],
            "export": ["export", "--run", world["run"], "--out", str(tmp_path / "out")]}[cmd]
    capsys.readouterr()
    assert _as_script(monkeypatch, argv) == 130
    lines = [l for l in (l.split("\r")[-1] for l in capsys.readouterr().err.split("\n")) if l.strip()]
    assert lines[-1] == "interrupted: nothing half-written is left" and all("%|" in l for l in lines[:-1]), lines
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name == ms.LOCK_FILE]


def test_31_10_a_torn_last_line_of_metrics_or_manifest_is_dropped(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 0.0')                       # power loss mid-line
    ms.main(_train_argv(world, run, "--max-steps", "2", "--resume"))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in rows] == [1, 1, 2] and rows[1]["event"] == "resume"
    gen = tmp_path / "gen"
    shutil.copytree(world["gen"], gen, ignore=shutil.ignore_patterns("eval.json"))
    good = (gen / "manifest.jsonl").read_text()
    (gen / "manifest.jsonl").write_text(good + '{"index": 2, "prom')
    ms.main(["sample", "--model", world["run"], "--prompt", "a red square", "--prompt", "a blue square", "--out",
             str(gen)])
    assert (gen / "manifest.jsonl").read_text() == good


def test_31_11_sixteen_bit_grey_keeps_its_range(tmp_path):
    import numpy as np
    from PIL import Image

    ramp = (np.arange(16)[None].repeat(16, 0) * 4369).astype(np.uint16)        # 0 .. 65535
    for a in (ramp, np.full((16, 16), 40000, np.uint16)):
        Image.fromarray(a).save(tmp_path / "grey16.png")
        px, _ = ms.load_image(tmp_path / "grey16.png", 16)
        assert torch.equal(px[0], torch.from_numpy((a >> 8).astype(np.float32)) / 127.5 - 1)


def test_31_12_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    portrait = Image.new("RGB", (16, 32), (255, 0, 0))                           # as shown: red top, blue bottom
    portrait.paste((0, 0, 255), (0, 16, 16, 32))
    exif = Image.Exif()
    exif[0x0112] = 6                                                              # a phone's "rotate 90 to show"
    portrait.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    px, ids = ms.load_image(tmp_path / "phone.png", 16)
    assert ids.tolist() == [32, 16, 8, 0, 16, 16]                                # SDXL: the shown size, centre crop
    assert px[0, 0].min() > 0.9 and px[2, -1].min() > 0.9                        # red on top, blue below


def _run_with_its_own_teacher(world, tmp_path):
    """A copy of the world's run whose teacher is its own copy, tmp_path/teacher; and the argv that resumes it."""
    shutil.copytree(world["teacher"], tmp_path / "teacher")
    run = _copy_run(world, tmp_path / "run", teacher=str(tmp_path / "teacher"))
    resume = _train_argv(world, run, "--max-steps", "2", "--resume")
    resume[resume.index("--teacher") + 1] = str(tmp_path / "teacher")
    return run, resume


def test_31_13_a_teacher_rebuilt_in_place_is_refused(world, tmp_path, capsys):
    run, resume = _run_with_its_own_teacher(world, tmp_path)
    sched = tmp_path / "teacher" / "scheduler" / "scheduler_config.json"      # rebuilt as v-prediction
    sched.write_text(sched.read_text().replace('"epsilon"', '"v_prediction"'))
    _refused(capsys, ms.main, resume, "different settings: teacher_fingerprint=")
    _refused(capsys, ms.main, ["export", "--run", str(run), "--out", str(tmp_path / "e")], "is not the model")


def test_31_16_a_moved_teacher_is_found_by_its_fingerprint(world, tmp_path, capsys):
    run, resume = _run_with_its_own_teacher(world, tmp_path)
    old, new = tmp_path / "teacher", tmp_path / "moved"
    old.rename(new)
    shutil.copytree(new, tmp_path / "other")                          # another model
    sched = tmp_path / "other" / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"epsilon"', '"v_prediction"'))
    sample = ["sample", "--model", str(run), "--prompt", "x", "--out", str(tmp_path / "s")]
    _refused(capsys, ms.main, sample, "is gone or is not the model")
    _refused(capsys, ms.main, sample + ["--base-model", str(tmp_path / "other")], "is not the model")
    ms.main(sample + ["--base-model", str(new)])
    ms.main(["export", "--run", str(run), "--out", str(tmp_path / "e"), "--base-model", str(new)])
    resume[resume.index("--teacher") + 1] = str(new)
    ms.main(resume)                                                   # the run now records where its teacher is
    assert json.loads((run / "config.json").read_text())["teacher"] == str(new)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["changed"]["teacher"] == [str(old), str(new)]


def test_31_15_a_prompts_file_bom_is_not_part_of_the_first_prompt(world, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"\xef\xbb\xbfa cat\r\na dog\r\n")      # as Windows' Notepad saves it
    ms.main(["sample", "--model", world["pipeline"], "--prompts-file", str(tmp_path / "prompts.txt"), "--steps", "1",
             "--out", str(tmp_path / "s")])
    rows = [json.loads(l) for l in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a cat", "a dog"]


def test_31_18_export_overwrite_keeps_out_until_one_last_rename(world, tmp_path, monkeypatch):
    """A kill anywhere before the final rename (here: while the new folder's permissions are set) leaves --out."""
    out = tmp_path / "pipe"
    shutil.copytree(world["pipeline"], out)
    (out / "mine.txt").write_text("the export it replaces")

    def killed(self, mode):
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "chmod", killed)
    with pytest.raises(KeyboardInterrupt):
        ms.main(["export", "--run", world["run"], "--out", str(out), "--overwrite"])
    assert (out / "mine.txt").is_file() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
