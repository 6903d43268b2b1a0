"""README.md's commands (and those of benchmarks/README.md and toy/results/README.md), run as written: every ```bash block's `python minisplam.py`, `python -m toy.tiny_sd` and
`python benchmarks/evaluate.py` line (for-loops expanded), and every ```python block, in README order in one
folder, so a later command reads what an earlier one wrote.

Only sizes and paths are shrunk; every flag stays. The hub ids stay too: tiny random teachers (toy/tiny_sd.py), a
tiny CLIP and a tiny VAE sit in a Hugging Face cache built here under the ids the README names, and the network is
cut, so an id the README names that is not in that cache fails the test. Shrinks: --resolution 16, --batch-size 2,
--lora-rank 4 (`train` gets the first two where its defaults would apply, 512 px and 8), and `train` adds
--max-steps 2 --validate-every 1 --num-workers 0 (so each run writes a validation
grid, also with LoRA + bf16); `/data/...` is a 3-image folder; `evaluate.py` adds a tiny --fid-features extractor;
"cuda" is "cpu"."""

import json
import re
import shlex
import shutil
import socket
from pathlib import Path

import pytest

import minisplam as ms
from test_cli import _features
from test_sd import _evaluate_main, _png, tiny_clip  # noqa: F401  (tiny_clip: a fixture)
from toy import tiny_sd

ROOT = Path(ms.__file__).parent
README = ROOT / "README.md"
MAINS = ("minisplam.py", "toy.tiny_sd", "benchmarks/evaluate.py")   # the toys' commands: tests/test_toy2d.py, ...
SHRINK = {"--resolution": "16", "--batch-size": "2", "--lora-rank": "4"}


def blocks(lang: str) -> list:
    """Fenced blocks of README.md, then of benchmarks/README.md and toy/results/README.md (their commands read what
    README.md's wrote)."""
    return [b for f in (README, ROOT / "benchmarks" / "README.md", ROOT / "toy" / "results" / "README.md")
            for b in re.findall(rf"^```{lang}\n(.*?)^```", f.read_text(), flags=re.S | re.M)]


def commands() -> list:
    """The README's command lines of MAINS (continuations joined, comments cut, `for x in a b; do C; done` expanded),
    as (entry point, argv)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            loop = re.fullmatch(r"\s*for (\w+) in ([^;]+); do (.+); done.*", line)
            for cmd in ([line] if not loop else [loop[3].replace("$" + loop[1], v) for v in loop[2].split()]):
                argv = shlex.split(cmd, comments=True)
                if len(argv) > 1 and Path(argv[0]).name == "python" and (argv[1] in MAINS or argv[2] in MAINS):
                    out.append((argv[1], argv[2:]) if argv[1] != "-m" else (argv[2], argv[3:]))
    return out


def shrink(argv: list, data: str, extra: dict) -> list:
    argv = [SHRINK.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
    argv = [data if a.startswith("/data/") else a for a in argv]
    for opt, value in extra.items():
        argv += [opt, value] if opt not in argv else []
    return argv


def test_readme_has_the_commands_this_test_runs():
    names = [(e, a[0] if e == "minisplam.py" else "") for e, a in commands()]
    for want in [("minisplam.py", "train"), ("minisplam.py", "sample"), ("minisplam.py", "export"),
                 ("benchmarks/evaluate.py", "")]:
        assert want in names, f"README lost its {want} command"
    train = [a for e, a in commands() if a[:1] == ["train"]]
    assert any("--lora-rank" in a and "bf16" in a for a in train), "a LoRA + bf16 command"
    assert any("stabilityai/stable-diffusion-xl-base-1.0" in a for a in train), "an SDXL command"


@pytest.fixture
def hub(tmp_path, tiny_clip, monkeypatch):  # noqa: F811
    """A Hugging Face cache holding tiny stand-ins under the README's hub ids; the network is unreachable."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf"
    sd, xl = tmp_path / "sd", tmp_path / "xl"
    tiny_sd.make_tiny_sd(str(sd))
    tiny_sd.make_tiny_sd(str(xl), arch="sdxl")
    for repo, src in {"stable-diffusion-v1-5/stable-diffusion-v1-5": sd, "stabilityai/stable-diffusion-xl-base-1.0": xl,
                      "madebyollin/sdxl-vae-fp16-fix": xl / "vae", "openai/clip-vit-large-patch14": tiny_clip}.items():
        d = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(src, d / "snapshots" / ("0" * 40))
        (d / "refs").mkdir()
        (d / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)

    def offline(*a, **k):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", offline)
    return cache


def test_every_readme_command_runs_as_written(hub, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    data = tmp_path / "laion"
    data.mkdir()
    for i, (color, text) in enumerate([((200, 30, 30), "a red square"), ((30, 200, 30), "a green circle"),
                                       ((30, 30, 200), "a blue square")]):
        (data / f"{i}.png").write_bytes(_png(color))
        (data / "metadata.jsonl").open("a").write(f'{{"file_name": "{i}.png", "text": "{text}"}}\n')
    (work / "coco30k.txt").write_text("a photo of a cat\na red square\na blue circle\n")
    ref = work / "coco2014_val_512"
    ref.mkdir()
    for i in range(4):
        (ref / f"{i}.png").write_bytes(_png((40 * i, 90, 200 - 40 * i), size=(16, 16)))
    features = _features(tmp_path / "features.pt")
    mains = {"minisplam.py": ms.main, "toy.tiny_sd": tiny_sd.main, "benchmarks/evaluate.py": _evaluate_main()}
    ran = []
    for entry, argv in commands():
        extra = ({"--max-steps": "2", "--validate-every": "1", "--num-workers": "0",
                  "--resolution": "16", "--batch-size": "2"} if argv[:1] == ["train"] else
                 {"--fid-features": features} if entry == "benchmarks/evaluate.py" else {})
        argv = shrink(argv, str(data), extra)
        try:
            rc = mains[entry](argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert not isinstance(rc, int) or rc == 0, f"python {entry} {shlex.join(argv)} failed ({rc}): {err}"
        ran.append(argv)
        if argv[:1] == ["train"]:
            run = Path(argv[argv.index("--output-dir") + 1])
            assert (run / "validation" / "step-0000002.png").is_file() and (run / "checkpoint-0000002").is_dir()
    assert len(ran) == len(commands())
    for n in (1, 2, 4):                                        # `cat gen1/eval.json ...`
        if (work / f"gen{n}").exists():
            assert {"fid", "clip_score", "n_images"} <= set(json.loads(
                (work / f"gen{n}" / "eval.json").read_text()))
    for code in blocks("python"):                              # the snippets that load our exports in diffusers
        exec(compile(code.replace('"cuda"', '"cpu"'), "README.md", "exec"), {})


def test_the_readme_finding_is_the_committed_study():
    """Each number and comparison of README's finding and results summary, against toy/results/*.json."""
    text = " ".join(README.read_text().split())
    rows = {}
    for name in ("study2d_anneal", "study2d"):
        for line in json.loads((ROOT / "toy" / "results" / f"{name}.json").read_text())["table"].splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault((name, cells[0], cells[2]), cells)                  # the 128-wide student's row
    lcm, best, paper = (rows["study2d_anneal", "exact", f"{m} k=20 cos80k"] for m in ("LCM", "SPLAM best", "SPLAM paper"))
    assert f"is {lcm[3]} for LCM, {paper[3]} for the paper's SPLAM" in text and f"{best[3]} for SPLAM with half" in text
    assert f"would score {lcm[4]}" in text
    mean = lambda c: float(c.split(" ± ")[0])  # noqa: E731
    assert mean(lcm[3]) < mean(best[3]) < mean(paper[3]) and mean(lcm[3]) > float(lcm[4])    # LCM beats; not at floor
    u, b = rows["study2d", "exact", "u-ablation k=20"], rows["study2d", "exact", "SPLAM best k=20"]
    l10 = rows["study2d", "exact", "LCM k=20"]
    assert (mean(b[3]) - mean(u[3])) > 0.5 * (mean(b[3]) - mean(l10[3]))       # "closes most of the gap"
    doubling = json.loads((ROOT / "toy" / "results" / "study2d_anneal.json").read_text())["doubling"]
    ratios = {m: [float(r.split("|")[4].strip(" ×")) for r in doubling.splitlines() if r.startswith(f"| {m} k=20 |")]
              for m in ("SPLAM best", "SPLAM paper")}                          # the study's own vs-LCM column
    assert len(ratios["SPLAM best"]) == len(ratios["SPLAM paper"]) == 4
    assert "(2.0-2.5× lower than SPLAM with half of its γ's at 1, 20-27× lower than the paper's SPLAM)" in text
    assert round(min(ratios["SPLAM best"]), 1) == 2.0 and round(max(ratios["SPLAM best"]), 1) == 2.5
    assert round(min(ratios["SPLAM paper"])) == 20 and round(max(ratios["SPLAM paper"])) == 27


def test_the_benchmarks_readme_claims_are_its_json():
    """Each comparison benchmarks/README.md states in words, over the committed JSON it cites."""
    import numpy as np

    text = " ".join((ROOT / "benchmarks" / "README.md").read_text().split())
    res = ROOT / "benchmarks" / "results"
    lc = json.loads((res / "learning_curve.json").read_text())
    at = lambda m, step, e: next(r for r in lc["summary"][m] if r["step"] == step)[e]  # noqa: E731
    mean = lambda m, step, e: at(m, step, e)["mean"]  # noqa: E731
    for m in ("LCM", "SPLAM"):                       # 1 step: k = 100 ME ahead of k = 20; 4 steps: the other way round
        assert mean(f"{m} k=100 ME", 400, "err_1") < mean(f"{m} k=20", 400, "err_1")
        assert mean(f"{m} k=100 ME", 400, "err_4") > mean(f"{m} k=20", 400, "err_4")
        assert (f"{m} {mean(f'{m} k=100 ME', 400, 'err_1'):.3f} vs {mean(f'{m} k=20', 400, 'err_1'):.3f}" in text and
                f"{m} {mean(f'{m} k=100 ME', 400, 'err_4'):.3f} vs {mean(f'{m} k=20', 400, 'err_4'):.3f}" in text)
    for k in ("k=20", "k=100 ME"):                   # LCM ahead at 1 and 4 steps at both k
        assert all(mean(f"LCM {k}", 400, e) < mean(f"SPLAM {k}", 400, e) for e in ("err_1", "err_4"))
    lcm, spl = at("LCM k=100 ME", 400, "err_2"), at("SPLAM k=100 ME", 400, "err_2")   # "they tie" at 2 steps, k = 100
    assert abs(lcm["mean"] - spl["mean"]) < lcm["std"] + spl["std"]
    delta = {(m, kind): np.mean([r["delta"][kind] for r in lc["runs"] if r["method"] == m], 0)
             for m in lc["summary"] for kind in ("ode", "same_noise")}
    ts = lc["runs"][0]["delta"]["t"]
    assert all((np.diff(delta[m, "ode"]) > 0).all() for m in lc["summary"])              # ODE delta grows with t
    for m in lc["summary"]:
        same = delta[m, "same_noise"]
        assert ts[int(np.argmin(same))] in (439, 599) and ts[int(np.argmax(same))] == 919
    lower = [t for t, a, b in zip(ts, delta["SPLAM k=100 ME", "same_noise"], delta["LCM k=100 ME", "same_noise"]) if a < b]
    assert lower == [119, 439, 599] and (delta["SPLAM k=100 ME", "ode"] > delta["LCM k=100 ME", "ode"]).all()
    ratios = []                                      # unfused LoRA sampling vs the exported UNet, same model and steps
    for full, lora in (("gpu_sd15shapes.json", "gpu_sd15shapeslora.json"), ("gpu_sdxlshapes.json", "gpu_sdxlshapeslora.json")):
        a, b = (json.loads((res / f).read_text())["latency_s"] for f in (full, lora))
        ratios += [b[n] / a[n] for n in a]
    assert f"{min(ratios):.1f}-{max(ratios):.1f}× slower" in text
