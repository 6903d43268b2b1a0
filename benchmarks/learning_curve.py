"""Does `python minisplam.py train` learn? Few-step error vs training step, through the unchanged CLI.

    python benchmarks/learning_curve.py             # the committed run (README gives its wall time)
    python benchmarks/learning_curve.py --quick     # plumbing check (what the test runs)

The teacher is the shapes teacher of toy/shapes_sd.py (a tiny SD UNet trained on captioned coloured shapes). Each
method is distilled with `minisplam.main(["train", ...])` in segments: train to step s, measure, `--resume` to the
next s (resume is exact, tested in tests/test_sd.py). Measured on fixed noise and prompts at every s:
  * the coupled 1/2/4-step error to the teacher's guided 100-step ODE (toy.measure.few_step_errors);
  * the held-out SPLAD loss (Eq. 17) on shapes the run never saw (toy/shapes_sd.py: heldout_loss);
and at the end delta(t) of Fig. 2c (toy.measure.consistency_delta). Results go to benchmarks/results/learning_curve.json
after every measurement (a rerun skips what is done) and learning_curve.png.
"""

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minisplam as ms  # noqa: E402
from toy import measure, shapes_sd as sh  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"LCM k=20": ["--objective", "lcm", "--k", "20"], "SPLAM k=20": ["--objective", "splam", "--k", "20"],
           "LCM k=100 ME": ["--objective", "lcm", "--k", "100"], "SPLAM k=100 ME": ["--objective", "splam", "--k", "100"]}


def settings(quick: bool) -> dict:
    return {"resolution": 8, "teacher_steps": 10 if quick else 300, "data": 32 if quick else 256, "batch": 16,
            "lr": 5e-4, "w": 3.0, "measure_at": [0, 2, 4] if quick else [0, 25, 50, 100, 200, 400],
            "seeds": 1 if quick else 3, "n_prompts": 6 if quick else 24, "ode_steps": 10 if quick else 100,
            "methods": ["SPLAM k=20"] if quick else ["LCM k=100 ME", "SPLAM k=100 ME", "LCM k=20", "SPLAM k=20"]}


def train_args(st, root: Path, run: Path, method: str, seed: int, steps: int, resume: bool):
    return ["train", "--teacher", str(root / "teacher"), "--data", str(root / "data"), "--output-dir", str(run),
            "--resolution", str(st["resolution"]), "--batch-size", str(st["batch"]), "--lr", str(st["lr"]),
            "--w", str(st["w"]), "--seed", str(seed), "--max-steps", str(steps), "--checkpoint-every", str(steps),
            "--validate-every", "0", "--num-workers", "0", *METHODS[method], *(["--resume"] if resume else [])]


def one_run(job):
    """One (method, seed): train segment by segment, measuring after each. Returns the curve and delta(t)."""
    st, root, method, seed = job["settings"], Path(job["root"]), job["method"], job["seed"]
    prompts = (sh.CAPTIONS * st["n_prompts"])[:st["n_prompts"]]
    sd, x_T, cond, ode = sh.reference(str(root / "teacher"), prompts, st["w"], 0, st["ode_steps"], st["resolution"])
    run = root / "runs" / f"{method.replace(' ', '_').replace('=', '')}-s{seed}"
    if run.exists():                             # an unfinished run of ours (results are saved per finished run)
        shutil.rmtree(run)
    cfg = ms.splad_config(vars(ms.build_parser().parse_args(train_args(st, root, run, method, seed, 1, False))))
    curve, t0, train_s = [], time.perf_counter(), 0.0
    for i, s in enumerate(st["measure_at"]):
        if s > 0:
            t1 = time.perf_counter()
            ms.main(train_args(st, root, run, method, seed, s, resume=i > 1))
            train_s += time.perf_counter() - t1
        src = str(run) if s > 0 else str(root / "teacher")
        err = sh.run_errors(src, sd, x_T, cond, ode)
        curve.append({"step": s, "train_s": train_s, **{f"err_{n}": e for n, e in err.items()},
                      "heldout_loss": sh.heldout_loss(src, sd, cfg, resolution=st["resolution"])})
        print(f"{method} seed {seed} step {s}: " + " ".join(f"{k} {v:.4f}" for k, v in curve[-1].items()), flush=True)
    unet = ms.load_run(run).unet
    x, caps = sh.shapes(32, st["resolution"], 3)
    with torch.no_grad():
        z0 = sd.pipe.vae.encode(x).latent_dist.mean * sd.pipe.vae.config.scaling_factor
        c = ms.encode_prompts(sd, caps, "cpu")
        u = ms.encode_prompts(sd, [""], "cpu").expand_as(c)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    model, teacher = (ms.unet_eps(m, sd.sched, sd.prediction_type) for m in (unet, sd.unet))
    delta = {"t": list(range(119, 1000, 160))}
    for key in ("ode", "same_noise"):
        delta[key] = []
    for t in delta["t"]:
        d = measure.consistency_delta(model, teacher, z0, noise, c, u, st["w"], sd.sched, t, 20, step=20)
        delta["ode"].append(d["ode"])
        delta["same_noise"].append(d["same_noise"])
    return {"method": method, "seed": seed, "curve": curve, "delta": delta, "wall_s": time.perf_counter() - t0}


def summary(runs, st):
    """Mean and std over seeds of every measurement, per method and step."""
    out = {}
    for method in st["methods"]:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        rows = []
        for i, s in enumerate(st["measure_at"]):
            row = {"step": s, "seeds": len(rs)}
            for key in ("err_1", "err_2", "err_4", "heldout_loss"):
                v = torch.tensor([r["curve"][i][key] for r in rs], dtype=torch.float64)
                row[key] = {"mean": v.mean().item(), "std": v.std().item() if len(rs) > 1 else 0.0}
            rows.append(row)
        out[method] = rows
    return out


def table(report) -> str:
    """Markdown: mean ± std over seeds of the 1/2/4-step errors and the held-out loss, at the first and last step
    and at step 100 (what tests/test_learning.py runs)."""
    f = lambda v: f"{v['mean']:.3f} ± {v['std']:.3f}"
    lines = ["| method | step | seeds | 1-step error | 2-step error | 4-step error | held-out SPLAD loss |",
             "|---|---|---|---|---|---|---|"]
    for method, rows in report["summary"].items():
        for r in rows:
            if r["step"] in (0, 100, rows[-1]["step"]):
                lines.append(f"| {method} | {r['step']} | {r['seeds']} | {f(r['err_1'])} | {f(r['err_2'])} | "
                             f"{f(r['err_4'])} | {f(r['heldout_loss'])} |")
    return "\n".join(lines)


def plot(report, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("err_1", "1-step error to teacher ODE"), ("err_2", "2-step error"), ("err_4", "4-step error"),
            ("heldout_loss", "held-out SPLAD loss (Eq. 17)")]
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.6))
    for ax, (key, label) in zip(axes, keys):
        for method, rows in report["summary"].items():
            x = [r["step"] for r in rows]
            m = torch.tensor([r[key]["mean"] for r in rows])
            sd = torch.tensor([r[key]["std"] for r in rows])
            ax.plot(x, m, marker="o", ms=3, label=f"{method} ({rows[0]['seeds']} seeds)")
            ax.fill_between(x, m - sd, m + sd, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("training step (python minisplam.py train)", fontsize=11)
        ax.set_ylabel(label, fontsize=11)
        ax.legend(fontsize=8)
    ax = axes[-1]
    for method in report["summary"]:
        ds = [r["delta"] for r in report["runs"] if r["method"] == method]
        ax.plot(ds[0]["t"], torch.tensor([d["ode"] for d in ds]).mean(0), marker="o", ms=3, label=method)
    ax.set_xlabel("t", fontsize=11)
    ax.set_ylabel("δ(t), Fig. 2c (k = 20, teacher ODE)", fontsize=11)
    ax.set_title("after the last step", fontsize=11)
    ax.legend(fontsize=8)
    fig.suptitle("The SD path learns: tiny SD UNet distilled from the shapes teacher (mean ± std over seeds)",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the plumbing only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=None, help="folder for the teacher and runs (default: OUT/work-*)")
    p.add_argument("--report", action="store_true", help="only summarise the runs in the JSON (table, figure)")
    a = p.parse_args(argv)
    st = settings(a.quick)
    name = "learning_curve_quick" if a.quick else "learning_curve"
    a.out.mkdir(parents=True, exist_ok=True)
    path, root = a.out / f"{name}.json", (a.work or a.out / f"work-{name}").resolve()
    report = json.loads(path.read_text()) if path.is_file() else {"settings": st, "runs": [], "wall_s": 0.0}
    if report["settings"] != st:
        raise SystemExit(f"{path} holds results with other settings; move it away first")
    t0 = time.perf_counter()
    if not a.report and not (root / "teacher" / "unet").is_dir():
        t1 = time.perf_counter()
        sh.make_teacher(root / "teacher", st["teacher_steps"], n=512, resolution=st["resolution"], batch=32)
        sh.write_imagefolder(root / "data", st["data"], st["resolution"], seed=1)
        report["teacher_s"] = time.perf_counter() - t1
    done = {(r["method"], r["seed"]) for r in report["runs"]}
    jobs = [{"settings": st, "root": str(root), "method": m, "seed": s} for s in range(st["seeds"])
            for m in st["methods"] if (m, s) not in done]
    with ProcessPoolExecutor(a.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:   # 1: in-process
        for res in (map if a.workers == 1 else pool.map)(one_run, [] if a.report else jobs):
            report["runs"].append(res)
            report["summary"] = summary(report["runs"], st)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            os.replace(tmp, path)
    report["wall_s"] += 0 if a.report else time.perf_counter() - t0
    report["summary"] = summary(report["runs"], st)
    report["command"] = f"python benchmarks/learning_curve.py{' --quick' if a.quick else ''}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    plot(report, a.out / f"{name}.png")
    print(table(report))
    print(f"wrote {path} and {name}.png ({report['wall_s']:.0f}s)")
    return report


if __name__ == "__main__":
    torch.set_num_threads(2)                                         # the 2-core CI machine; workers use 1 each
    main()
