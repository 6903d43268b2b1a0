"""Nothing a user runs can destroy a run or end in a traceback (issue 21).

`test_every_option_of_every_entry_point` walks the argparse actions of `minisplam.py train | sample | export`,
`python -m toy.tiny_sd` and `benchmarks/evaluate.py`, and gives every option each value a user can mistype. Every
call must succeed or print one `error:` line with exit code 2, and no file outside the call's own new output may
change. The tests after it each reproduce one reported failure (issue 21, items 1-9).
"""

import hashlib
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


def entry_points(w, new):
    """name -> (parser, base argv that succeeds, run(argv)), `new` a fresh output path for this call."""
    train = ["train", "--teacher", w["teacher"], "--data", w["data"], "--output-dir", new, "--k", "20", *FAST,
             "--batch-size", "1", "--max-steps", "1", "--validate-every", "0"]
    subs = ms.build_parser()._subparsers._group_actions[0].choices
    return {
        "train": (subs["train"], train, ms.main),
        "sample": (subs["sample"], ["sample", "--model", w["run"], "--prompt", "a red square", "--out", new], ms.main),
        "export": (subs["export"], ["export", "--run", w["run"], "--out", new], ms.main),
        "toy.tiny_sd": (tiny_sd.build_parser(), [new], tiny_sd.main),
        "evaluate.py": (evaluate.build_parser(), ["--images", w["gen"], "--reference", w["ref"], "--fid-features",
                                                  w["features"], "--size", "16", "--clip-model", w["clip"]],
                        evaluate.main),
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
    for name in ("train", "sample", "export", "toy.tiny_sd", "evaluate.py"):
        parser = entry_points(world, "x")[name][0]
        for action in parser._actions:
            if action.dest in ("help",):
                continue
            for raw in (["(flag)"] if action.nargs == 0 else VALUES):
                n += 1
                new = str(tmp_path / f"new-{n}")
                _, base, run = entry_points(world, new)[name]
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
