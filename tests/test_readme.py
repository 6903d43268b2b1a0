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


def md_rows(table: str) -> list:
    """The body rows of a markdown table (the studies' JSON keep theirs as text), each as its stripped cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]


def doubling_rows(report: dict) -> dict:
    """An annealed study's doubling table by (method, budget): [2] the final error, [3] the ratio to LCM ("2.54×"),
    [6] the curve's lowest point and where it was ("0.167 (67%)")."""
    return {(c[0], int(c[1].replace(",", ""))): c for c in md_rows(report["doubling"])}


def ahead(a: dict, b: dict) -> bool:
    """a (a {"mean", "std"} over seeds) is ahead of b, lower by more than the two spreads together; else level."""
    return b["mean"] - b["std"] - a["mean"] - a["std"] > 0


def test_the_readme_finding_is_the_committed_study():
    """Each number and comparison of README's finding and results summary, against toy/results/*.json."""
    text = " ".join(README.read_text().split())
    rows = {}
    for name in ("study2d_anneal", "study2d"):
        for cells in md_rows(json.loads((ROOT / "toy" / "results" / f"{name}.json").read_text())["table"]):
            rows.setdefault((name, cells[0], cells[2]), cells)                  # the 128-wide student's row
    lcm, best, paper = (rows["study2d_anneal", "exact", f"{m} k=20 cos80k"] for m in ("LCM", "SPLAM best", "SPLAM paper"))
    assert f"is {lcm[3]} for LCM, {paper[3]} for the paper's SPLAM" in text and f"{best[3]} for SPLAM with half" in text
    assert f"would score {lcm[4]}" in text
    mean = lambda c: float(c.split(" ± ")[0])  # noqa: E731
    assert mean(lcm[3]) < mean(best[3]) < mean(paper[3]) and mean(lcm[3]) > float(lcm[4])    # LCM beats; not at floor
    closes = ablation_closes()
    assert "closes 87-99% of the gap between SPLAM and LCM" in text
    assert (round(100 * min(closes.values())), round(100 * max(closes.values()))) == (87, 99)
    err = ablation_means()
    S = ablation_summary()
    lead = lambda a, b: ahead(S[a]["err_1step"], S[b]["err_1step"])  # noqa: E731
    assert min(err, key=err.get) == "LCM k=100 ME" and not lead("LCM k=100 ME", "u-ablation half k=100 ME")   # level with u
    assert err["LCM k=100 noME"] > err["LCM k=20"] > err["LCM k=100 ME"]
    assert "the lowest mean error of the study (level with the u ablation), lower than at k = 20" in text
    assert "without multiple estimation k = 100 is indeed worse than k = 20" in text
    dl = [lead(f"DL{sh} {k}", f"SPLAM {'ours' if sh else 'paper'} {k}") for sh in ("", " half") for k in ("k=20", "k=100 ME")]
    assert dl == [True, True, True, False] and not lead("SPLAM ours k=100 ME", "DL half k=100 ME")     # 3 ahead, 1 level
    assert "is ahead of SPLAM's SL-ODE at three of four matched γ shares and k, level at the fourth" in text
    doubling = doubling_rows(json.loads((ROOT / "toy" / "results" / "study2d_anneal.json").read_text()))
    ratios = {m: [float(c[3].rstrip("×")) for (name, _), c in doubling.items() if name == f"{m} k=20"]
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


def ablation_summary() -> dict:
    data = json.loads((ROOT / "toy" / "results" / "study2d_ablations.json").read_text())
    return {r["method"]: r for r in data["summary"]}


def ablation_means() -> dict:
    return {m: r["err_1step"]["mean"] for m, r in ablation_summary().items()}


def ablation_closes() -> dict:
    """The share of the SPLAM - LCM gap (1-step error) that the u ablation closes, at matched gamma shares."""
    e = ablation_means()
    return {(share, k): (e[f"{s} {k}"] - e[f"{u} {k}"]) / (e[f"{s} {k}"] - e[f"LCM {k}"])
            for share, (s, u) in {"0": ("SPLAM paper", "u-ablation"), "0.5": ("SPLAM ours", "u-ablation half")}.items()
            for k in ("k=20", "k=100 ME")}


def test_the_toy_readme_ablation_reading_is_its_json():
    """Every number and comparison of toy/results/README.md's reading of the ablation study, over the JSON."""
    import numpy as np

    text = " ".join((ROOT / "toy" / "results" / "README.md").read_text().split())
    S = ablation_summary()
    data = json.loads((ROOT / "toy" / "results" / "study2d_ablations.json").read_text())
    mu = lambda m, key="err_1step": S[m][key]["mean"]  # noqa: E731
    pm = lambda m, key="err_1step", d=3: f"{mu(m, key):.{d}f} ± {S[m][key]['std']:.{d}f}"  # noqa: E731
    lead = lambda a, b, key="err_1step": ahead(S[a][key], S[b][key])  # noqa: E731
    tie = lambda a, b, key="err_1step": not lead(a, b, key) and not lead(b, a, key)  # noqa: E731
    # the runs are the main study's, re-run: within 1.1% per run
    main = json.loads((ROOT / "toy" / "results" / "study2d.json").read_text())
    old = {(r["method"].replace("SPLAM best", "SPLAM ours"), r["seed"]): r["err_1step"] for r in main["runs"]
           if (r["teacher"], r["width"]) == ("exact", 128)}
    rel = [abs(old[r["method"], r["seed"]] / r["err_1step"] - 1) for r in data["runs"] if (r["method"], r["seed"]) in old]
    assert len(rel) == 30 and max(rel) < 0.011 and "within 1.1% of the main study's" in text
    # LCM ahead at k = 20 (error and NLL at 1/2/4 steps); at k = 100 ME ahead by the error, a tie by the NLL
    for n in (1, 2, 4):
        assert lead("LCM k=20", "SPLAM ours k=20", f"nll_{n}") and tie("LCM k=100 ME", "SPLAM ours k=100 ME", f"nll_{n}")
    assert lead("LCM k=20", "SPLAM ours k=20") and lead("LCM k=100 ME", "SPLAM ours k=100 ME")
    ratio = [mu("SPLAM ours k=20", f"nll_{n}") / mu("LCM k=20", f"nll_{n}") for n in (1, 2, 4)]
    assert "SPLAM ours is " + ", ".join(f"{r:.1f}×" for r in ratio[:2]) + f" and {ratio[2]:.1f}× LCM's at 1, 2 and 4" in text
    assert all(mu(f"SPLAM ours k=20", f"nll_{n}") > 20 * mu("LCM k=20", "nll_floor") for n in (1, 2, 4))
    for m in ("LCM k=20", "SPLAM ours k=20", "LCM k=100 ME", "SPLAM ours k=100 ME", "LCM k=100 noME", "SPLAM ours k=100 noME"):
        assert pm(m) in text, m
    assert f"{pm('LCM k=100 ME', 'nll_1', 2)} vs {pm('SPLAM ours k=100 ME', 'nll_1', 2)}" in text
    # the lowest error of the study; the u ablation at half level with it
    assert min(S, key=mu) == "LCM k=100 ME" and tie("LCM k=100 ME", "u-ablation half k=100 ME")
    # k or multiple estimation
    for m in ("LCM", "SPLAM ours"):
        assert mu(f"{m} k=100 noME") > mu(f"{m} k=20") > mu(f"{m} k=100 ME")
    assert tie("LCM k=100 noME", "SPLAM ours k=100 noME")
    # the gamma share closes 96% / 95%
    share = [(mu(f"SPLAM paper {k}") - mu(f"SPLAM ours {k}")) / (mu(f"SPLAM paper {k}") - mu(f"LCM {k}")) for k in ("k=20", "k=100 ME")]
    assert [round(100 * v) for v in share] == [96, 95] and "closes 96% (k = 20) and 95% (k = 100 ME)" in text
    # the u ablation at matched shares
    c = ablation_closes()
    assert f"{100 * c['0', 'k=20']:.1f}% (k = 20) and {100 * c['0', 'k=100 ME']:.1f}% (k = 100 ME)" in text
    assert f"and {100 * c['0.5', 'k=20']:.0f}% and {100 * c['0.5', 'k=100 ME']:.0f}% of the gap between SPLAM ours" in text
    e = ablation_means()
    confounded = [(e[f"SPLAM ours {k}"] - e[f"u-ablation {k}"]) / (e[f"SPLAM ours {k}"] - e[f"LCM {k}"]) for k in ("k=20", "k=100 ME")]
    assert [round(100 * v) for v in confounded] == [64, 67]                       # the earlier, confounded reading
    # sigma' vs Eq. 24
    for a, b in (("SPLAM ours k=20", "SPLAM authors half k=20"), ("SPLAM ours k=100 ME", "SPLAM authors half k=100 ME"),
                 ("SPLAM paper k=100 ME", "SPLAM authors k=100 ME")):
        assert tie(a, b)
    assert lead("SPLAM paper k=20", "SPLAM authors k=20") and lead("LCM k=20", "SPLAM paper k=20")
    # SL vs DL at matched shares
    for dl, sl in (("DL k=20", "SPLAM paper k=20"), ("DL k=100 ME", "SPLAM paper k=100 ME"), ("DL half k=20", "SPLAM ours k=20")):
        assert lead(dl, sl)
    assert tie("DL half k=100 ME", "SPLAM ours k=100 ME")
    assert "DL is ahead at three of four, level at the fourth" in text and "SL is nowhere ahead of DL" in text
    assert not any(lead(sl, dl) for dl, sl in (("DL k=20", "SPLAM paper k=20"), ("DL k=100 ME", "SPLAM paper k=100 ME"),
                                                 ("DL half k=20", "SPLAM ours k=20"), ("DL half k=100 ME", "SPLAM ours k=100 ME")))
    for k in ("k=20", "k=100 ME"):
        for share in ("", " half"):
            sl = f"SPLAM {'ours' if share else 'paper'} {k}"
            assert mu(f"LCM {k}") < mu(f"DL{share} {k}") < mu(sl) < mu(f"SPLAM authors{share} {k}")
    # against the training-free solvers
    B = data["baselines"]
    bm = lambda name, key: float(np.mean([r[key] for r in B[name]]))  # noqa: E731
    for key in ("err_1step", "nll_1", "nll_2"):
        best = min(bm("DDIM", key), bm("DPM-Solver++(2M)", key))
        assert sorted(m for m in S if mu(m, key) >= best) == ["SPLAM authors k=20", "SPLAM paper k=20"]
    solver_split = max(bm(b, f"split_{n}") for b in ("DDIM", "DPM-Solver++(2M)") for n in (1, 2))   # at the floor
    assert solver_split < 1.5 * mu("LCM k=20", "split_floor") and f"(0.007 at 1 and 2 steps)" in text
    assert f"{solver_split:.3f}" == "0.007" and f"(DL k = 20: {mu('DL k=20', 'split_1'):.3f} at 1 step)" in text
    assert mu("DL k=20", "split_1") > 10 * solver_split                          # "several distilled models do not"
    assert sum(mu(m, f"split_{n}") > 2 * solver_split for m in S for n in (1, 2) if "k=20" not in m or "DL" in m) >= 3
    pre = "pre-trained (no distillation)"
    assert bm(pre, "err_1step") < bm("DDIM", "err_1step") and bm(pre, "nll_1") < bm("DDIM", "nll_1")
    assert bm(pre, "nll_2") > min(bm("DDIM", "nll_2"), bm("DPM-Solver++(2M)", "nll_2"))
    assert (f"(1-step error {bm(pre, 'err_1step'):.3f} vs {bm('DDIM', 'err_1step'):.3f}, NLL excess {bm(pre, 'nll_1'):.1f} vs "
            f"{bm('DDIM', 'nll_1'):.1f}), but not at 2 steps ({bm(pre, 'nll_2'):.1f} vs {bm('DDIM', 'nll_2'):.1f})") in text
    # delta(t): SPLAM ours above LCM at every t (k = 20), below at 2 of 45 (k = 100 ME)
    d = lambda m, kind: np.mean([r["delta"][kind] for r in data["runs"] if r["method"] == m], 0)  # noqa: E731
    r20 = {kind: d("SPLAM ours k=20", kind) / d("LCM k=20", kind) for kind in ("ode", "same_noise")}
    assert all((v > 1).all() and len(v) == 45 for v in r20.values())
    assert (f"{r20['ode'].min():.1f}-{r20['ode'].max():.1f}× by the ODE δ, "
            f"{r20['same_noise'].min():.1f}-{r20['same_noise'].max():.1f}× by the same-noise δ") in text
    r100 = {kind: d("SPLAM ours k=100 ME", kind) / d("LCM k=100 ME", kind) for kind in ("ode", "same_noise")}
    assert all((v < 1).sum() == 2 and v.min() > 0.985 and round(v.max(), 1) <= 1.9 for v in r100.values())


def test_the_toy_readme_main_study_reading_is_its_json():
    """The strong words of toy/results/README.md's main-study reading (never, ahead, removes), over study2d.json."""
    import numpy as np

    text = " ".join((ROOT / "toy" / "results" / "README.md").read_text().split())
    main = json.loads((ROOT / "toy" / "results" / "study2d.json").read_text())
    runs = [r for r in main["runs"] if (r["teacher"], r["width"]) == ("exact", 128)]
    curve = lambda m: np.array([r["curve"]["err_1"] for r in runs if r["method"] == m])  # noqa: E731
    for k, rise in (("k=20", 12.6), ("k=100 ME", 39)):                  # LCM never above its start; its local rises
        c = curve(f"LCM {k}")
        assert (c[:, 1:] <= c[:, :1]).all() and round(100 * (c[:, 1:] / c[:, :-1] - 1).max(), 1 if k == "k=20" else 0) == rise
    assert "by up to 12.6% at k = 20 and 39% at k = 100 ME" in text
    best20, best100 = curve("SPLAM best k=20"), curve("SPLAM best k=100 ME")
    it = np.array(next(r["curve"]["iter"] for r in runs if r["method"] == "SPLAM best k=20"))
    assert round((best20.max(1) / best20[:, 0]).max(), 2) == 1.11 and (best20[:, it >= 500] < best20[:, :1]).all()
    assert (best100[:, 1:] < best100[:, :1]).all() and it[1] == 250           # below its start from iteration 250
    paper = curve("SPLAM paper k=20")
    assert (round((paper.max(1) / paper[:, 0]).min(), 1), round((paper.max(1) / paper[:, 0]).max(), 1)) == (4.6, 6.8)
    S = {(r["teacher"], r["width"], r["method"]): r["err_1step"]["mean"] for r in main["summary"]}
    for teacher in ("exact", "learned"):                                  # the ranking, both teachers
        e = {m: S[teacher, 128, f"{m} k=20"] for m in ("LCM", "SPLAM best", "DL", "SPLAM paper")}
        assert e["LCM"] < e["SPLAM best"] < e["DL"] < e["SPLAM paper"]
    assert S["exact", 128, "LCM k=100 ME"] < S["exact", 128, "SPLAM best k=100 ME"] < S["exact", 128, "DL k=100 ME"] < S["exact", 128, "SPLAM paper k=100 ME"]
    assert all(S[key] > S[key[0], key[1], "LCM " + key[2].split(" ", 2)[-1]] for key in S
               if not key[2].startswith("LCM") and "share=" not in key[2] and key[2].split(" ", 2)[-1] in ("k=20", "k=100 ME"))
    long_ratio = S["exact", 128, "SPLAM best k=20 long"] / S["exact", 128, "LCM k=20 long"]
    ratio10 = S["exact", 128, "SPLAM best k=20"] / S["exact", 128, "LCM k=20"]
    assert f"the gap narrows from {ratio10:.1f}× to {long_ratio:.1f}×" in text and (round(ratio10, 1), round(long_ratio, 1)) == (2.2, 1.7)
    from collections import Counter

    readme = " ".join(README.read_text().split())
    kinds = Counter((r["curve"]["iter"][-1], "share=" in r["method"]) for r in main["runs"])
    assert kinds == {(10000, False): 51, (5000, True): 6, (30000, False): 6} and len(main["runs"]) == 63
    assert ("63 runs of the 2D toy (51 of 10,000 iterations on 3 seeds, 6 one-seed screens of the γ path at 5,000 and 6 "
            "runs of 30,000)") in readme
    assert len(json.loads((ROOT / "toy" / "results" / "study2d_ablations.json").read_text())["runs"]) == 60


def test_the_toy_readme_image_toy_reading_is_its_json():
    """The image toy's comparisons in toy/results/README.md (solvers against the distilled models, seeds 0-3; AMED and
    iPNDM on seed 0), over image_toy_seeds.json and image_toy_full/image_toy.json."""
    text = " ".join((ROOT / "toy" / "results" / "README.md").read_text().split())
    seeds = json.loads((ROOT / "toy" / "results" / "image_toy_seeds.json").read_text())
    wins = {row["nfe"]: (sum(a < b for a, b in zip(row["lcm_fd"], row["best_solver_fd"])),
                         sum(a < b for a, b in zip(row["splam_fd"], row["best_solver_fd"])))
            for row in seeds["rows"] if row["nfe"] >= 2}
    assert wins == {2: (4, 4), 3: (4, 3), 4: (4, 2), 5: (2, 2), 8: (1, 2)}
    assert "LCM beats it on 4 of 4 seeds at 2, 3 and 4 NFE, SPLAM on 4, 3 and 2 of 4" in text
    assert "at 5 NFE each distilled model wins on 2 of 4 seeds, at 8 NFE LCM on 1 and SPLAM on 2" in text
    r = json.loads((ROOT / "toy" / "results" / "image_toy_full" / "image_toy.json").read_text())["results"]
    fd = lambda m, n: r[m][str(n)]["fd_proxy"]  # noqa: E731
    err = lambda m, n: r[m][str(n)]["err_to_ode"]  # noqa: E731
    nfes = (2, 3, 4, 5, 8)
    assert [n for n in nfes if fd("AMED-Solver", n) < fd("DDIM", n)] == [3, 4, 5]
    assert not [n for n in nfes if err("AMED-Solver", n) < err("DDIM", n)]
    assert all(fd("AMED-Solver", n) > max(fd("UniPC", n), fd("DPM-Solver++(2M)", n)) for n in nfes)
    assert all(fd("iPNDM", n) > max(fd("UniPC", n), fd("DPM-Solver++(2M)", n)) for n in (2, 3, 4, 5))
    solvers = ("DDIM", "DPM-Solver++(2M)", "UniPC", "iPNDM", "AMED-Solver")
    assert min(solvers, key=lambda m: fd(m, 8)) == "iPNDM"
    t_fd = seeds["teacher_fd_proxy"]                                           # seed 0's is the full run's
    assert f"{r['teacher ODE (100 steps)']['ref']['fd_proxy']:.1f}" == f"{t_fd['0']:.1f}"
    assert (f"the teacher's own 100-step samples score {min(t_fd.values()):.1f}-{max(t_fd.values()):.1f} over the four "
            f"seeds ({t_fd['0']:.1f} on seed 0)") in text


def test_the_remaining_readings_are_their_json():
    """The strong words left over by the ablation, main-study and image-toy tests: the SD learning benchmark (every
    objective learns), the screen's winner, the lr 3e-3 curves, the image toy's 1-step lead and curves, the u ablation's
    place in the main study and LCM's local rises in the long runs."""
    import numpy as np

    R = ROOT / "toy" / "results"
    text = " ".join((R / "README.md").read_text().split())
    top = " ".join(README.read_text().split())
    bench = " ".join((ROOT / "benchmarks" / "README.md").read_text().split())
    # benchmarks: after 400 steps the 1-step error is down by 17-48%, the 4-step error by 78-85%, for every objective
    lc = json.loads((ROOT / "benchmarks" / "results" / "learning_curve.json").read_text())["summary"]
    drop = {n: [1 - next(r for r in rows if r["step"] == 400)[f"err_{n}"]["mean"] / rows[0][f"err_{n}"]["mean"]
                for rows in lc.values()] for n in (1, 4)}
    assert len(drop[1]) == 4 and min(drop[1] + drop[4]) > 0
    assert f"the 1-step error is down by {100 * min(drop[1]):.0f}-{100 * max(drop[1]):.0f}% and the 4-step error by " \
           f"{100 * min(drop[4]):.0f}-{100 * max(drop[4]):.0f}%" in bench
    assert f"down {100 * min(drop[4]):.0f}-{100 * max(drop[4]):.0f}% for every objective" in top
    # the screen: the authors' features at share 0.5 have the lowest 1-step error, 7% below fourier16's
    main = json.loads((R / "study2d.json").read_text())
    screen = {r["method"]: r["err_1step"]["mean"] for r in main["summary"] if "share=" in r["method"]}
    best = min(screen, key=screen.get)
    runner = min((v for m, v in screen.items() if m != best))
    assert best == "SPLAM authors share=0.5 k=20" and screen["SPLAM fourier16 share=0.5 k=20"] == runner
    assert f"won by {100 * (runner / screen[best] - 1):.0f}% over fourier16, {screen[best]:.3f} vs {runner:.3f}" in text
    # the main study: the u ablation sits between SPLAM best and LCM (exact teacher, 128 wide)
    m = {r["method"]: r["err_1step"]["mean"] for r in main["summary"] if (r["teacher"], r["width"]) == ("exact", 128)}
    assert all(m[f"LCM {k}"] < m[f"u-ablation {k}"] < m[f"SPLAM best {k}"] for k in ("k=20", "k=100 ME"))
    # LCM in the 30,000-iteration runs: never above its start, local rises up to 22%
    long = [r["curve"]["err_1"] for r in main["runs"] if r["method"] == "LCM k=20 long"]
    assert len(long) == 3 and all(max(c[1:]) <= c[0] for c in long)
    assert round(100 * max(b / a - 1 for c in long for a, b in zip(c, c[1:]))) == 22 and "runs by up to 22%" in text
    # lr 3e-3: LCM's lowest point kept falling; LCM leads by 2.2-8x
    hot = json.loads((R / "study2d_anneal_lr0.003.json").read_text())
    hot_rows = doubling_rows(hot)
    low = [float(c[6].split("(")[0]) for (name, _), c in hot_rows.items() if name == "LCM k=20"]
    assert low[0] > low[1] > low[2] and "kept falling: " + " → ".join(f"{v:.3f}" for v in low) in text
    ratios = [float(c[3].rstrip("×")) for (name, _), c in hot_rows.items() if name.startswith("SPLAM best ")]
    assert round(min(ratios), 1) == 2.2 and round(max(ratios)) == 8 and "LCM leads SPLAM best by 2.2-8×" in text
    # the image toy: LCM leads at 1 step on every seed (FD-proxy and error); last-jump error below SPLAM's at >= 2 NFE
    rows = {r["nfe"]: r for r in json.loads((R / "image_toy_seeds.json").read_text())["rows"]}
    d1 = rows[1]["splam_minus_lcm"]
    assert min(d1) > 0 and f"by {min(d1):.0f}-{max(d1):.0f} FD-proxy points (+{np.mean(d1):.1f} ± {np.std(d1, ddof=1):.1f})" in text
    assert all(a < b for r in rows.values() for a, b in zip(r["lcm_err"], r["splam_err"]))
    curves = [json.loads((R / f"image_toy_full{s}" / "image_toy.json").read_text())["curves"] for s in ("", "_seed1", "_seed2", "_seed3")]
    lcm = [[p["err_1"] for p in c["LCM"]] for c in curves]
    assert all(all(b < a for a, b in zip(e, e[1:])) for e in lcm) and "LCM's falls at every evaluation" in text
    last = [1 - c[m][-1]["err_1"] / c[m][-2]["err_1"] for c in curves for m in ("LCM", "SPLAM")]
    assert min(last) > 0 and f"both 1-step errors still fell by {100 * min(last):.1f}-{100 * max(last):.1f}% on every seed" in text
    # README: sigma' with multiple estimation, notebook 2's stored measurement (the full run)
    nb2 = json.loads((ROOT / "notebooks" / "02_sigma_gamma_error.ipynb").read_text())
    out = "".join("".join(o.get("text", "")) for c in nb2["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    a, b = (float(v) for v in re.search(r"t=599: max \|measured - σ'\| = ([\d.]+),\s+max \|measured - Eq.24\| = ([\d.]+)", out).groups())
    assert a > 0.01 and f"within {a:.3f} of σ′ at t = 599, k = 100, against {b:.3f} for Eq. 24" in top


def test_the_toy_readme_anneal_reading_is_its_json():
    """The annealed check's reading in toy/results/README.md and README's NLL sentence, over study2d_anneal.json:
    per-doubling changes, LCM ahead at every budget, the gap's ratios, the mode metric (NLL ratios, where the two are
    level, splits at the floor), the u ablation's closes and the late minimum of SPLAM best's curves."""
    R = ROOT / "toy" / "results"
    text = " ".join((R / "README.md").read_text().split())
    top = " ".join(README.read_text().split())
    ann = json.loads((R / "study2d_anneal.json").read_text())
    S = {r["method"]: r for r in ann["summary"]}
    budgets = ann["settings"]["budgets"]
    assert budgets == [10000, 20000, 40000, 80000]
    ms = lambda m, n, e="err_1step": S[f"{m} k=20 cos{n // 1000}k"][e]["mean"]  # noqa: E731
    sd = lambda m, n, e="err_1step": S[f"{m} k=20 cos{n // 1000}k"][e]["std"]  # noqa: E731
    lead = lambda a, b, n, e: ahead(*(S[f"{m} k=20 cos{n // 1000}k"][e] for m in (a, b)))  # noqa: E731
    change = {m: [round(100 * (ms(m, b) / ms(m, a) - 1)) for a, b in zip(budgets, budgets[1:])]
              for m in ("LCM", "SPLAM best", "SPLAM paper")}
    assert all(c <= -5 for cs in change.values() for c in cs)                            # none converged
    for m, name in (("LCM", "LCM"), ("SPLAM best", "SPLAM best"), ("SPLAM paper", "the paper's SPLAM")):
        assert f"{name} " + ", ".join(f"−{-c}%" for c in change[m]) in text
    assert (min(change["LCM"] + change["SPLAM best"]), max(change["LCM"] + change["SPLAM best"])) == (-40, -25)
    last = int(min(100 * (1 - ms(m, 80000) / ms(m, 40000)) for m in change))   # README: the last doubling, floored
    assert last >= 18 and f"the last doubling of the budget still lowered each one's error by {last}% or more" in top
    flags = [r["converged"] for r in ann["runs"]]
    assert f"it is true for {sum(flags)} of the {len(flags)} annealed runs" in top and 0 < sum(flags) < len(flags)
    assert "by 25-40%" in text and f"LCM's {ms('LCM', 80000):.3f} is still {ms('LCM', 80000) / ann['runs'][0]['fixed_point_err']:.0f}× the floor" in text
    assert all(lead("LCM", m, n, "err_1step") for n in budgets for m in ("SPLAM best", "SPLAM paper"))
    assert lead("LCM", "SPLAM best", 10000, "err_1step") and ms("LCM", 10000) + sd("LCM", 10000) < ms("SPLAM best", 40000) - sd("SPLAM best", 40000)
    assert f"LCM at 10,000 iterations ({ms('LCM', 10000):.3f}) is already better than SPLAM best at 40,000 ({ms('SPLAM best', 40000):.3f})" in text
    assert ms("SPLAM best", 80000) - sd("SPLAM best", 80000) < ms("LCM", 20000) + sd("LCM", 20000)   # level
    assert f"at 20k, {ms('LCM', 20000):.3f} ± {sd('LCM', 20000):.3f}, is level with SPLAM best at 80k, " \
           f"{ms('SPLAM best', 80000):.3f} ± {sd('SPLAM best', 80000):.3f}, within their seeds' spread" in text
    walls = {n: [r["wall_s"] / 60 for r in ann["runs"] if r["curve"]["iter"][-1] == n] for n in (10000, 80000)}
    assert 1 <= min(walls[10000]) and max(walls[10000]) <= 2.5 and 8 <= min(walls[80000]) and max(walls[80000]) <= 12.5
    assert f"({len(ann['runs'])} runs, {sum(r['wall_s'] for r in ann['runs']) / 60:.0f} core-minutes; a run of 10,000 " \
           "iterations took 1-2.5 min, one of 80,000 took 8-12.5 min)" in text
    rows = doubling_rows(ann)
    ratio = {key: float(c[3].rstrip("×")) for key, c in rows.items()}
    assert "2.54× LCM's error (10k) to 2.47× (20k), 1.98× (40k) and 2.04× (80k)" in text
    assert [ratio["SPLAM best k=20", n] for n in budgets] == [2.54, 2.47, 1.98, 2.04]
    assert [round(ratio["SPLAM paper k=20", n]) for n in budgets] == [27, 25, 20, 23]
    assert f"23× at 80k ({S['SPLAM paper k=20 cos80k']['err_1step']['mean']:.3f} ± {sd('SPLAM paper', 80000):.3f}, −19%)" in text
    paper = [r for r in ann["runs"] if r["method"] == "SPLAM paper k=20 cos80k"]
    fell = [100 * (1 - r["curve"]["err_1"][-1] / r["curve"]["err_1"][0]) for r in paper]   # on the curve's own noises
    assert len(paper) == 3 and min(fell) > 0 and \
        f"seed by seed only {round(min(fell))}-{round(max(fell))}% below where it started before distillation" in text
    # the mode metric: NLL ratios, LCM ahead beyond the spreads except at 80k and 4 steps, splits at the floor
    nll1 = [ms("SPLAM best", n, "nll_1") / ms("LCM", n, "nll_1") for n in budgets]
    assert "is " + ", ".join(f"{v:.1f}×" for v in nll1[:3]) + f" and {nll1[3]:.1f}× LCM's at 10k, 20k, 40k and 80k" in text
    assert f"LCM {ms('LCM', 10000, 'nll_1'):.2f} → {ms('LCM', 80000, 'nll_1'):.2f} nats, SPLAM best " \
           f"{ms('SPLAM best', 10000, 'nll_1'):.2f} → {ms('SPLAM best', 80000, 'nll_1'):.2f}" in text
    nll4 = [ms("SPLAM best", n, "nll_4") / ms("LCM", n, "nll_4") for n in budgets]
    assert f"falls from {nll4[0]:.1f}× to {nll4[-1]:.1f}×" in text and nll4 == sorted(nll4, reverse=True)
    level = [(n, s) for n in budgets for s in (1, 2, 4) if not lead("LCM", "SPLAM best", n, f"nll_{s}")]
    assert level == [(80000, 4)] and all(ms("LCM", n, f"nll_{s}") < ms("SPLAM best", n, f"nll_{s}")
                                         for n in budgets for s in (1, 2, 4))
    assert f"({ms('LCM', 80000, 'nll_4'):.3f} ± {sd('LCM', 80000, 'nll_4'):.3f} and " \
           f"{ms('SPLAM best', 80000, 'nll_4'):.3f} ± {sd('SPLAM best', 80000, 'nll_4'):.3f})" in text
    splits = {m: [r[f"split_{s}"]["mean"] for r in ann["summary"] if r["method"].startswith(m) for s in (1, 2, 4)]
              for m in ("LCM", "SPLAM best", "u-ablation", "SPLAM paper")}
    floor = ann["summary"][0]["split_floor"]["mean"]
    tight = splits["LCM"] + splits["SPLAM best"] + splits["u-ablation"]
    runs = [r[f"split_{s}"] for r in ann["runs"] if not r["method"].startswith("SPLAM paper") for s in (1, 2, 4)]
    assert f"at most {max(tight):.3f} at every budget by the mean over seeds (single runs up to {max(runs):.3f}, " \
           f"{max(runs) / floor:.1f}× the noise floor of {floor:.3f}), the paper's SPLAM's " \
           f"{min(splits['SPLAM paper']):.3f}-{max(splits['SPLAM paper']):.3f}" in text
    assert max(runs) < 2.5 * floor < min(splits["SPLAM paper"])
    sw = [S[f"{m} k=20 cos80k"]["sw2_1"]["mean"] for m in ("LCM", "SPLAM best")]
    assert all(v < S["LCM k=20 cos80k"]["noise_floor"]["mean"] for v in sw)
    assert f"({sw[0]:.3f} and {sw[1]:.3f} at 80k, floor {S['LCM k=20 cos80k']['noise_floor']['mean']:.3f})" in text
    # the u ablation, annealed: the share of each gap it closes, and LCM still ahead of it at 20k
    closes = lambda a, u, n: (ms(a, n) - ms(u, n)) / (ms(a, n) - ms("LCM", n))  # noqa: E731
    half = [round(100 * closes("SPLAM best", "u-ablation half", n)) for n in (10000, 20000)]
    zero = [round(100 * closes("SPLAM paper", "u-ablation", n)) for n in (10000, 20000)]
    assert f"closes {half[0]}% (10k) and {half[1]}% (20k)" in text and f"and {zero[0]}% and {zero[1]}% of the gap" in text
    assert lead("LCM", "u-ablation half", 20000, "err_1step") and \
        f"20k: {ms('LCM', 20000):.3f} ± {sd('LCM', 20000):.3f} against {ms('u-ablation half', 20000):.3f} ± " \
        f"{sd('u-ablation half', 20000):.3f}" in text
    # SPLAM best's curves bottom out before the end from 20k on; LCM's late
    at_share = lambda m, n: int(rows[m, n][6].split("(")[1].strip("%)"))  # noqa: E731  where the curve's lowest point was
    at = [at_share("SPLAM best k=20", n) for n in budgets[1:]]
    curves = lambda m, n: [r["curve"]["err_1"] for r in ann["runs"] if r["method"] == f"{m} k=20 cos{n // 1000}k"]  # noqa: E731
    below = lambda m, n: 100 * (1 - sum(map(min, curves(m, n))) / sum(c[-1] for c in curves(m, n)))  # noqa: E731  same noises
    b = [below("SPLAM best", n) for n in budgets[1:]]
    assert f"lowest point is at {min(at)}-{max(at)}% of the budget from 20,000 on, {round(min(b))}-{round(max(b))}% below " \
           "the end of its own curve (the same 1,000 noises)" in text
    lcm_at = [at_share("LCM k=20", n) for n in budgets]
    assert f"LCM's is at {min(lcm_at)}-{max(lcm_at)}%, under 1% below its end" in text
    assert max(below("LCM", n) for n in budgets) < 1 < min(b)
    r = [ratio["SPLAM best k=20", n] for n in budgets]
    assert (round(min(r), 1), round(max(r), 1)) == (2.0, 2.5) and "best stays at 2.0-2.5× LCM's error" in text
    # README: the NLL excess of the finding
    assert "By the 1-step samples' NLL excess under the true mixture (right panel) the order is the same: " \
           f"{ms('LCM', 80000, 'nll_1'):.2f} ± {sd('LCM', 80000, 'nll_1'):.2f} nats for LCM, " \
           f"{ms('SPLAM best', 80000, 'nll_1'):.2f} ± {sd('SPLAM best', 80000, 'nll_1'):.2f} for SPLAM with half of its γ's at 1, " \
           f"{ms('SPLAM paper', 80000, 'nll_1'):.1f} ± {sd('SPLAM paper', 80000, 'nll_1'):.1f} for the paper's SPLAM " \
           f"(noise floor {ann['summary'][0]['nll_floor']['mean']:.3f}; the dotted line is twice that)" in top
    assert ms("LCM", 80000, "nll_1") < ms("SPLAM best", 80000, "nll_1") < ms("SPLAM paper", 80000, "nll_1")
