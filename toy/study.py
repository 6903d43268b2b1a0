"""Convergence study on the 2D toy: does SPLAM beat LCM once both are trained to a plateau?

    python toy/study.py              # the committed study (2 worker processes; see README for its wall time)
    python toy/study.py --quick      # plumbing check in seconds (what the test runs)

Phase 1 (screen, seed 0, exact teacher, 128-wide student, k = 20): SPLAM with each gamma feature set of
`minisplam.GAMMA_FEATURES`, with gamma ~ U[0, 1] (the paper) and with half of the draws at gamma = 1.
The variant with the lowest final 1-step error is "SPLAM best".
Phase 2 (every seed): LCM, the paper's SPLAM (authors' gamma features, gamma ~ U[0, 1]), SPLAM best and the
DL-ODE, for
  * the exact teacher (closed-form GMM eps), 128-wide student: k = 20 and k = 100 with multiple estimation;
  * the learned teacher (the pre-trained MLP itself, an imperfect teacher), 128 wide, k = 20;
  * a 256-wide student (4x the parameters), exact teacher, k = 20;
and the "u ablation" (exact teacher, 128 wide, both k): the SL point fed to the gamma = 1 network at the effective
time u(gamma, t) where sigma(u)/alpha(u) = (1 - gamma) sigma(s)/alpha(s) + gamma sigma(t)/alpha(t) (notebook 4).
Every run: same data stream, seeds, lr, batch and iteration budget. Metrics on fixed noise: the coupled 1-step
error |F(x_T) - ODE_200(x_T)| (no noise floor: same noise), and sliced W2 of 1/2/4-step samples against an
independent set of teacher ODE samples, beside its floor (two independent teacher sets).
Results are written to toy/results/study2d.json after every run (a rerun skips finished runs) and
toy/results/study2d.png (error vs iteration, Fig. 2b).
"""

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import minisplam as ms
from toy import toy2d as t2

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = dict(objective="splam", gamma_features="authors", gamma_one_share=0.0)
LR = 3e-4                       # the main study's AdamW lr
PRETRAIN_KIND = "fourier4"      # the committed pre-trained nets were initialised with this (unused) gamma path


def screen_variants():
    return {f"SPLAM {kind} share={share}": dict(objective="splam", gamma_features=kind, gamma_one_share=share)
            for kind in ms.GAMMA_FEATURES for share in (0.0, 0.5)}


def effective_time(gamma, t, s, sched: ms.VPSchedule):
    """u(gamma, t) and alpha_u / alpha_t for the SL point between x_s and x_t (notebook 4).

    With one DDIM step x_s = alpha_s x0 + sigma_s eps, so x_{gamma,t} = alpha_t x0 + sigma'(gamma,t) eps: the teacher's
    DDIM state at the u with rho(u) = sigma'/alpha_t = (1-gamma) rho(s) + gamma rho(t), rho = sigma/alpha (u is
    fractional: linear in rho between grid points), scaled by alpha_t/alpha_u."""
    rho = (sched.sigma / sched.alpha).double()
    g = gamma.double()
    r = (1 - g) * rho[s] + g * rho[t]
    i = torch.searchsorted(rho, r).clamp(1, sched.T - 1)
    u = (i - 1) + (r - rho[i - 1]) / (rho[i] - rho[i - 1])
    scale = (1 / (1 + r**2).sqrt()) / sched.alpha[t].double()                   # alpha_u / alpha_t (VP)
    one = gamma == 1
    return torch.where(one, t.double(), u).float(), torch.where(one, torch.ones_like(scale), scale).float()


def u_ablation(net, sched: ms.VPSchedule, k: int):
    """Not SPLAM: the gamma = 1 network evaluated at the SL point's effective time u(gamma, t), with the point
    rescaled to the teacher's DDIM state there (effective_time). It measures the cost of learning (t, gamma) -> u."""

    def model(x, t, c, gamma):
        u, scale = effective_time(gamma, t, (t - k).clamp(min=0), sched)
        return net(x * scale[:, None], u, c, None)

    return model


def converged(curve, frac: float = 0.2, tol: float = 0.05):
    """Plateau test on the 1-step error: the mean over the last `frac` of the run is within `tol` (relative) of
    the mean over the `frac` before it, or lower by less than that."""
    it, err = torch.tensor(curve["iter"], dtype=torch.float64), torch.tensor(curve["err_1"], dtype=torch.float64)
    n = it[-1]
    last, prev = err[it > (1 - frac) * n].mean(), err[(it > (1 - 2 * frac) * n) & (it <= (1 - frac) * n)].mean()
    return bool((prev - last) / prev < tol), float(last), float(prev)


def pretrained(cache: Path, gmm, sched, iters, seed, width):
    """The pre-trained MLP of (seed, width), trained once and kept in `cache` (atomic write; same result if two
    workers race)."""
    f = cache / f"pretrained-w{width}-s{seed}-i{iters}.pt"
    pre = t2.MLP(width, gamma_kind=PRETRAIN_KIND)
    if f.is_file():
        pre.load_state_dict(torch.load(f, weights_only=True))
        return pre
    pre = t2.pretrain(gmm, sched, iters, seed, hidden=width, gamma_kind=PRETRAIN_KIND)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{f.name}.{os.getpid()}.tmp"
    torch.save(pre.state_dict(), tmp)
    os.replace(tmp, f)
    return pre


_EVAL_SETS = {}                                 # per process: each group's set-up is built once, not once per method


def evaluation_set(a, teacher_kind, width, seed, cache):
    """The pre-trained MLP of (seed, width) and the evaluation set of the exact or the learned teacher (that MLP).
    Neither is changed by its users (distill copies the MLP's weights), so a process keeps them for its next task."""
    key = (teacher_kind, width, seed, a["pretrain_iters"], a["w"], a["n_eval"], str(cache))
    if key not in _EVAL_SETS:
        sched, gmm = ms.sd_schedule(), t2.GMM()
        pre = pretrained(cache, gmm, sched, a["pretrain_iters"], seed, width)
        teacher = t2.exact_teacher(gmm, sched) if teacher_kind == "exact" else (lambda x, t, c: pre(x, t, c))
        _EVAL_SETS[key] = pre, t2.EvalSet(gmm, teacher, sched, a["w"], a["n_eval"], seed)
    return _EVAL_SETS[key]


def run_group(task):
    """One (teacher, width, seed) group: pre-train once, build the evaluation set once, distil each method."""
    torch.set_num_threads(1)
    a, teacher_kind, width, seed, methods = (task[k] for k in ("args", "teacher", "width", "seed", "methods"))
    pre, ev = evaluation_set(a, teacher_kind, width, seed, task["cache"])
    sched, gmm, teacher = ev.sched, t2.GMM(), ev.teacher
    out = []
    for name, spec in methods.items():
        spec = dict(spec)
        wrap_u = spec.pop("u_ablation", False)
        cfg = ms.SPLADConfig(w=a["w"], loss="l2", **spec)
        t0 = time.perf_counter()
        net, curve = t2.distill(None, pre, gmm, teacher, sched, ev, a["iters"], seed, a["w"], a["lr"], a["batch"],
                                a["eval_every"], cfg=cfg, wrap=(lambda n: u_ablation(n, sched, cfg.k)) if wrap_u else None,
                                anneal=a.get("anneal", False))
        res = t2.evaluate(net, ev, sched, seed)
        ok, last, prev = converged(curve)
        quick = a["n_eval"] < 1000                                                  # --quick: a few t only
        delta = t2.consistency_error(net, gmm, teacher, sched, a["w"], n=100 if quick else 1000, seed=seed,
                                     stride=440 if quick else 20)                   # Fig. 2c, k = 20
        save_student(task["cache"], a, teacher_kind, width, seed, name, net)
        out.append({"teacher": teacher_kind, "width": width, "seed": seed, "method": name, "spec": task["methods"][name],
                    **res, "noise_floor": ev.noise_floor, "nll_floor": ev.nll_floor, "split_floor": ev.split_floor,
                    "nll_teacher": ev.nll_teacher, "converged": ok, "err1_last20": last, "err1_prev20": prev,
                    "curve": curve, "delta": delta, "wall_s": time.perf_counter() - t0})
    return out


def student_path(cache: Path, a, teacher_kind, width, seed, name) -> Path:
    """Where a run's final EMA student is kept (git-ignored cache), so that a new metric needs no retraining."""
    tag = f"i{a['iters']}-lr{a['lr']:g}{'-cos' if a.get('anneal') else ''}"
    return cache / "students" / f"{teacher_kind}-w{width}-s{seed}-{tag}-{name.replace(' ', '_')}.pt"


def save_student(cache: Path, a, teacher_kind, width, seed, name, net):
    f = student_path(cache, a, teacher_kind, width, seed, name)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, f)


def load_student(cache: Path, a, teacher_kind, width, seed, name, spec) -> "t2.MLP":
    """The saved EMA student of a run (save_student), as an MLP with the run's gamma path."""
    net = t2.MLP(width, gamma_kind=spec.get("gamma_features", "authors"))
    net.load_state_dict(torch.load(student_path(cache, a, teacher_kind, width, seed, name), weights_only=True))
    return net


def _pretrain(job):
    torch.set_num_threads(1)
    cache, iters, seed, width = job
    pretrained(cache, t2.GMM(), ms.sd_schedule(), iters, seed, width)


def fixed_points(report, cache):
    """Every run's floor of the 1-step error, EvalSet.fixed_point_error: the error of a perfectly trained student,
    the same for LCM and SPLAM (k = 20 and k = 100 with multiple estimation share the solver step 20). Computed once
    per (teacher, seed, step) and kept in the JSON."""
    fp = report.setdefault("fixed_point", {})
    for r in report["runs"]:
        step = ms.SPLADConfig(**{k: v for k, v in r["spec"].items() if k != "u_ablation"}).solver_step
        teacher = "exact" if r["teacher"] == "exact" else f"{r['teacher']}-w{r['width']}"   # the learned teacher is the MLP
        k = f"{teacher}/{r['seed']}/{step}"
        if k not in fp:
            fp[k] = evaluation_set(report["settings"], r["teacher"], r["width"], r["seed"], cache)[1].fixed_point_error(step)
        r["fixed_point_err"] = fp[k]
    return fp


def key(r):
    return f"{r['teacher']}/{r['width']}/{r['seed']}/{r['method']}"


def save(path: Path, report: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def run_tasks(tasks, report, path, workers, cache, remeasure=False):
    """Run every (task, method) not yet in the report, saving the JSON after each. remeasure: also rerun the runs
    saved before the mode metric and the saved students existed (training is deterministic, so the rerun
    reproduces their 1-step error), replacing them."""
    done = {key(r) for r in report["runs"] if "nll_1" in r or not remeasure}
    todo = []
    for task in tasks:
        left = {n: s for n, s in task["methods"].items()
                if f"{task['teacher']}/{task['width']}/{task['seed']}/{n}" not in done}
        if left:
            todo.append({**task, "methods": left, "cache": cache})
    # one method per task, so both workers stay busy; each worker builds a group's set-up once (evaluation_set)
    todo = [{**t, "methods": {n: s}} for t in todo for n, s in t["methods"].items()]
    with ProcessPoolExecutor(workers) as pool:
        for res in pool.map(run_group, todo):
            new = {key(r) for r in res}
            report["runs"] = [r for r in report["runs"] if key(r) not in new] + res      # a remeasured run replaces
            save(path, report)
            for r in res:
                print(f"{key(r):<48} err1 {r['err_1step']:.4f}  sw2 1/2/4 {r['sw2_1']:.4f} {r['sw2_2']:.4f} "
                      f"{r['sw2_4']:.4f}  converged={r['converged']}  {r['wall_s']:.0f}s", flush=True)


def stats(vals):
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(vals) > 1 else 0.0, "n": len(vals)}


def summary(report):
    """Mean and std over seeds for every (teacher, width, method)."""
    groups = {}
    for r in report["runs"]:
        groups.setdefault((r["teacher"], r["width"], r["method"]), []).append(r)
    rows = []
    for (teacher, width, method), rs in groups.items():
        metrics = [m for m in ("err_1step", "fixed_point_err", "sw2_1", "sw2_2", "sw2_4", "noise_floor", "nll_1",
                               "nll_2", "nll_4", "split_1", "split_2", "split_4", "nll_floor", "split_floor")
                   if all(m in r for r in rs)]                      # the mode metric: runs since the ablation study
        rows.append({"teacher": teacher, "width": width, "method": method, "seeds": sorted(r["seed"] for r in rs),
                     **{m: stats([r[m] for r in rs]) for m in metrics},
                     "converged": sum(r["converged"] for r in rs)})
    return rows


def table(rows, phase=None):
    """Markdown table of the main results (what the README shows)."""
    f = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    lines = ["| teacher | width | method | 1-step error | its floor (mean) | SW2 1 step | SW2 2 steps | SW2 4 steps | SW2 floor | converged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if phase is None or (r["method"].startswith("SPLAM ") and "share=" in r["method"]) == (phase == "screen"):
            lines.append(f"| {r['teacher']} | {r['width']} | {r['method']} | {f(r['err_1step'])} | {r['fixed_point_err']['mean']:.4f} | {f(r['sw2_1'])} | "
                         f"{f(r['sw2_2'])} | {f(r['sw2_4'])} | {f(r['noise_floor'])} | {r['converged']}/{len(r['seeds'])} |")
    return "\n".join(lines)


def readme_block(report) -> str:
    """The README's study section body, generated from the JSON (python toy/study.py --report rewrites it)."""
    st, runs = report["settings"], report["runs"]
    core_min = sum(r["wall_s"] for r in runs) / 60
    main = [r for r in runs if not ("share=" in r["method"])]
    conv = sum(r["converged"] for r in main)
    return "\n".join([
        f"Settings: {st['iters']} iterations per run (screen: {st['screen_iters']}), batch {st['batch']}, AdamW lr "
        f"{st['lr']}, w = {st['w']}, L2 loss, EMA 0.95, evaluation on {st['n_eval']} fixed noises. "
        f"{len(runs)} runs, {core_min:.0f} core-minutes of training and evaluation on this 2-core CPU "
        f"(`{report.get('command', 'python toy/study.py')}`, 2 worker processes).",
        "",
        "*1-step error* = mean ‖F(x_T) − ODE₂₀₀(x_T)‖ from the same noise: an upper bound on the Wasserstein-1 distance, with no sampling floor. "
        "*SW2* = sliced W2 against an independent set of teacher ODE samples; its *floor* (two independent teacher sets) "
        "is in the next column. *its floor*: the 1-step error of a perfectly trained student, the teacher's own DDIM "
        "chain from x_T in the solver's steps (`EvalSet.fixed_point_error`; LCM and SPLAM share it, since at γ = 1 "
        "SPLAM's target is LCM's). *converged*: runs whose 1-step error fell less than 5% between the last two fifths "
        f"of training (`converged()` in toy/study.py); {conv} of {len(main)} main runs.",
        "",
        f"Screen (seed 0, exact teacher, 128 wide, k = 20, {st['screen_iters']} iterations); best: "
        f"**{report['best_variant']['method']}**",
        "",
        report["screen_table"],
        "",
        "Main comparison (mean ± std over seeds):",
        "",
        report["table"],
    ])


def write_readme(report, readme: Path, name="study2d", cmd="python toy/study.py --report", block=None):
    text = readme.read_text()
    begin, end = f"<!-- {name}:begin ({cmd}) -->", f"<!-- {name}:end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        body = readme_block(report) if block is None else block
        readme.write_text(head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1])


def plot(report, path: Path):
    """The study's curves, mean over seeds: 1-step error (top) and 4-step SW2 (bottom) per setting. Colour = method
    (toy.palette), line style = k; one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from toy import palette

    panels = [p for p in (("exact", 128, "k=20"), ("exact", 128, "k=100 ME"), ("learned", 128, "k=20"),
                          ("exact", 256, "k=20"),
                          ("exact", 128, "long"))
              if any((r["teacher"], r["width"]) == p[:2] and r["method"].endswith(p[2]) for r in report["runs"])]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.4 * len(panels), 8), squeeze=False)
    families, seeds = {}, set()
    for j, (teacher, width, k) in enumerate(panels):
        for metric, ax in zip(("err_1", "sw2_4"), axes[:, j]):
            curves = {}
            for r in report["runs"]:
                if (r["teacher"], r["width"]) == (teacher, width) and r["method"].endswith(k) and "share=" not in r["method"]:
                    curves.setdefault(r["method"], []).append(r["curve"])
            for name, cs in sorted(curves.items()):
                y = torch.tensor([c[metric] for c in cs]).mean(0)
                ax.plot(cs[0]["iter"], y, lw=1.3, **palette.style(name))
                families.setdefault(name.split(" k=")[0], name)
                seeds.add(len(cs))
            if metric == "sw2_4":
                ax.axhspan(0.11, 0.17, color="0.87", lw=0)
            ax.set_yscale("log")
            ax.set_xlabel("distillation iteration", fontsize=11)
            ax.set_ylabel("1-step error |F(x_T) − ODE(x_T)| (data units)" if metric == "err_1" else
                          "4-step SW2, 1000 points (data units)", fontsize=11)
            ax.set_title(f"{teacher} teacher, width {width}, " + ("k=20, 3x budget" if k == "long" else k), fontsize=11)
            ax.tick_params(labelsize=10)
    labels = {"SPLAM best": "SPLAM best (ours: half of the γ's at 1)", "SPLAM paper": "SPLAM paper (γ ~ U[0, 1])",
              "DL": "DL-ODE", "u-ablation": "u-ablation (given u(γ, t))"}
    handles = [plt.Line2D([], [], color=palette.color(name), lw=2, label=labels.get(fam, fam))
               for fam, name in sorted(families.items(), key=lambda f: list(palette.COLORS).index(palette.family(f[1])))]
    handles += [plt.Line2D([], [], color="0.3", ls=ls, lw=1.3, label=lab) for ls, lab in (("-", "k=20"), ("--", "k=100 ME"))]
    handles.append(Patch(color="0.87", label="SW2 noise floor, 1000 points\n(0.14 ± 0.03, two teacher sets)"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=10, frameon=False,
               title=f"mean over {'/'.join(map(str, sorted(seeds)))} seeds", title_fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def anneal_study(a, settings):
    """Convergence by annealing: each method's lr decays to 0 over its budget, so its error ends on a plateau; a run
    has converged when doubling the budget (10k -> 20k) changes its 1-step error by less than 5%. Same seeds, data,
    lr and schedule for every method; the best variant is the one phase 1 of the main study chose."""
    q = a.quick
    tag = f"_lr{settings['lr']:g}" if settings["lr"] != LR else ""                # another lr: its own JSON
    path = a.out / (f"study2d_anneal{tag}_quick.json" if q else f"study2d_anneal{tag}.json")
    budgets = (20, 40) if q else tuple(int(b) for b in a.budgets.split(","))
    best = json.loads((RESULTS / "study2d.json").read_text())["best_variant"]["spec"]    # the committed screen's
    methods = {"LCM k=20": dict(objective="lcm", k=20), "SPLAM paper k=20": {**PAPER, "k": 20},
               "SPLAM best k=20": {**best, "k": 20}}
    u_methods = {"u-ablation k=20": dict(objective="splam", gamma_one_share=0.0, u_ablation=True, k=20),
                 "u-ablation half k=20": dict(objective="splam", gamma_one_share=0.5, u_ablation=True, k=20)}
    report = json.loads(path.read_text()) if path.is_file() else {}
    settings = {**settings, "anneal": True}
    old = {k: v for k, v in report.get("settings", settings).items() if k != "budgets"}
    if old != settings:
        raise SystemExit(f"{path} holds a study with other settings; move it away or pass the same settings")
    budgets = tuple(sorted(set(budgets) | set(report.get("settings", {}).get("budgets", []))))
    u_budgets = budgets[:2] if not tag else ()     # the u ablation: the two smallest budgets (a doubling), main lr
    settings["budgets"] = list(budgets)
    report = {"settings": settings, "runs": report.get("runs", []), "wall_s": report.get("wall_s", 0.0)}
    t0 = time.perf_counter()
    cache = a.out / "cache"
    with ProcessPoolExecutor(a.workers) as pool:
        list([] if a.report else pool.map(_pretrain, [(cache, settings["pretrain_iters"], s, 128)
                                                       for s in range(settings["seeds"])]))
    first = ("LCM k=20", "SPLAM best k=20")       # the pair that decides the comparison runs first on every seed,
    ctag = lambda n: f"cos{n // 1000 if n >= 1000 else n}{'k' * (n >= 1000)}"  # noqa: E731
    tasks = [{"args": {**settings, "iters": n, "eval_every": max(n // (4 if q else 40), 1)}, "teacher": "exact",
              "width": 128, "seed": s, "methods": {f"{m} {ctag(n)}": v for m, v in methods.items() if (m in first) == lead}}
             for n in budgets for lead in (True, False) for s in range(settings["seeds"])]   # so a cut run stays paired
    tasks += [{"args": {**settings, "iters": n, "eval_every": max(n // (4 if q else 40), 1)}, "teacher": "exact",
               "width": 128, "seed": s, "methods": {f"{m} {ctag(n)}": v for m, v in u_methods.items()}}
              for n in u_budgets for s in range(settings["seeds"])]
    tasks.sort(key=lambda task: task["args"]["iters"])      # the smaller budgets first (stable: pairs stay together)
    if not a.report:
        run_tasks(tasks, report, path, a.workers, cache, remeasure=a.remeasure)
    report["wall_s"] += 0 if a.report else time.perf_counter() - t0
    fixed_points(report, cache)
    report["summary"] = summary(report)
    report["command"] = f"python toy/study.py --anneal{' --quick' if q else ''}" + (f" --lr {settings['lr']:g}" if tag else "")
    report["table"] = table(report["summary"])
    report["doubling"] = doubling(report, budgets)
    save(path, report)
    if not tag:
        plot_headline(report, path.with_suffix(".png"))
    if not q and a.out == RESULTS:                  # README block "anneal" (or "anneal_lr0.003") if it has one
        st = report["settings"]
        have = {(r["method"], r["seed"]) for r in report["runs"]}
        missing = [f"{m} seed {t['seed']}" for t in tasks for m in t["methods"] if (m, t["seed"]) not in have]
        write_readme(report, RESULTS / "README.md", "anneal" + tag, report["command"] + " --report", "\n".join([
            f"Settings: the main study's{f' except the peak lr (main study: {LR:g})' if tag else ''} "
            f"(batch {st['batch']}, AdamW lr {st['lr']:g} cosine-decayed to 0 over the budget, "
            f"w = {st['w']}, L2, EMA 0.95, {st['n_eval']} evaluation noises), exact teacher, 128 wide, k = 20, seeds "
            f"0-{st['seeds'] - 1}; budgets {' and '.join(f'{n:,}' for n in budgets)} iterations. {len(report['runs'])} runs, "
            f"{sum(r['wall_s'] for r in report['runs']) / 60:.0f} core-minutes (`{report['command']}`, 2 workers). "
            f"The floor of the 1-step error, a perfectly trained student's (the teacher's DDIM chain in steps of 20, "
            f"the same for LCM and for SPLAM with a share of its γ's at 1): {report['summary'][0]['fixed_point_err']['mean']:.4f} ± "
            f"{report['summary'][0]['fixed_point_err']['std']:.4f}." + (f" Not run yet: {', '.join(missing)} (the same "
            f"command resumes them)." if missing else ""),
            "", report["doubling"], "", anneal_modes(report) or report["table"]]))
    print(report["table"] + "\n\n" + report["doubling"])
    return report


def anneal_modes(report):
    """The annealed runs' mode metric (modes_table), budget by budget; None while a run predates the metric."""
    rows = [r for r in report["summary"] if "nll_1" in r]
    if len(rows) < len(report["summary"]):
        return None
    budget = lambda r: int(r["method"].rsplit(" cos", 1)[1].replace("k", "000"))  # noqa: E731
    return modes_table(sorted(rows, key=lambda r: (budget(r), r["method"])))


def plot_headline(report, path: Path):
    """The README's headline figure, from the annealed study: each method's final 1-step error and 1-step NLL excess
    against the budget (mean ± std over seeds), with the floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toy import palette

    by = {}
    for r in report["runs"]:
        by.setdefault(r["method"].rsplit(" cos", 1)[0], {}).setdefault(r["curve"]["iter"][-1], []).append(r)
    label = {"LCM k=20": "LCM", "SPLAM best k=20": "SPLAM best = ours (half of the γ's at 1)", "SPLAM paper k=20":
             "SPLAM paper (γ ~ U[0, 1])", "u-ablation half k=20": "u ablation, half at 1", "u-ablation k=20": "u ablation, no γ at 1"}
    budgets = sorted({n for d in by.values() for n in d})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for (metric, ax, ylabel) in (("err_1step", axes[0], "final 1-step error to the teacher's ODE (data units)"),
                                 ("nll_1", axes[1], "1-step NLL excess over the teacher (nats)")):
        for name in label:
            ns = sorted(n for n, rs in by.get(name, {}).items() if all(metric in r for r in rs))
            if not ns:
                continue
            vals = [torch.tensor([r[metric] for r in by[name][n]], dtype=torch.float64) for n in ns]
            ax.errorbar(ns, [v.mean().item() for v in vals], [v.std().item() if len(v) > 1 else 0 for v in vals],
                        capsize=3, label=f"{label[name]} ({len(vals[0])} seeds)", **{"marker": "s", **palette.style(name)})
        floor = ([report["runs"][0]["fixed_point_err"], "a perfectly trained student"] if metric == "err_1step" else
                 [2 * max((r["nll_floor"] for r in report["runs"] if "nll_floor" in r), default=0), "2 × the noise floor"])
        floor_line = ax.axhline(floor[0], color="k", ls=":", label=floor[1])
        if ax is axes[0]:                                       # the left panel's own floor, off the data
            ax.legend(handles=[floor_line], loc="lower left", bbox_to_anchor=(0, 0.06))
        ax.set(xscale="log", yscale="log", xlabel="training budget (iterations; lr cosine-annealed to 0 over it)",
               ylabel=ylabel)
        ax.set_xticks(budgets, [f"{n // 1000}k" if n >= 1000 else str(n) for n in budgets])
        ax.minorticks_off()
    axes[0].set_title("2D toy, k = 20, exact teacher: the 1-step error")
    axes[1].set_title("the same runs: 1-step samples' NLL excess")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation_methods():
    """The headline comparison and every ablation of it, named for what each is (toy/results/README.md):
    'SPLAM paper' is the paper's text (sigma', gamma ~ U[0, 1]); 'SPLAM authors' the authors' script (Eq. 24's
    closed-form sigma, gamma ~ U[0, 1]); 'SPLAM ours' minisplam's default (sigma', half of the gammas at 1; the
    main study's 'SPLAM best'); 'half': the same with half of the gammas at exactly 1; the u ablation and the DL-ODE
    at both shares; k = 100 without multiple estimation for LCM and SPLAM ours."""
    half = dict(gamma_one_share=0.5)
    base = {"LCM": dict(objective="lcm"), "SPLAM paper": PAPER, "SPLAM ours": {**PAPER, **half},
            "SPLAM authors": {**PAPER, "objective": "splam-closed"},
            "SPLAM authors half": {**PAPER, "objective": "splam-closed", **half},
            "DL": {**PAPER, "objective": "dl"}, "DL half": {**PAPER, "objective": "dl", **half},
            "u-ablation": dict(objective="splam", gamma_one_share=0.0, u_ablation=True),
            "u-ablation half": dict(objective="splam", u_ablation=True, **half)}
    ks = {"k=20": dict(k=20), "k=100 ME": dict(k=100)}
    out = {f"{m} {kn}": {**spec, **kv} for m, spec in base.items() for kn, kv in ks.items()}
    out.update({f"{m} k=100 noME": {**base[m], "k": 100, "multiple_estimation": False} for m in ("LCM", "SPLAM ours")})
    return out


HEADLINE = ("LCM", "SPLAM paper", "SPLAM ours")     # re-measured first: the comparison the README states


def ablation_study(a, settings):
    """The main study's headline methods re-run with the mode metric (EvalSet.modes), every final student and its
    delta(t) kept, and the ablations that separate the causes: the u ablation and the DL-ODE at gamma-share 0 and
    0.5, the authors' closed-form sigma (Eq. 24) at both shares, k = 100 without multiple estimation.
    Same settings as the main study (constant lr, 10,000 iterations, exact teacher, 128 wide, 3 seeds)."""
    q = a.quick
    path = a.out / ("study2d_ablations_quick.json" if q else "study2d_ablations.json")
    report = json.loads(path.read_text()) if path.is_file() else {}
    if report.get("settings", settings) != settings:
        raise SystemExit(f"{path} holds a study with other settings; move it away or pass the same settings")
    report = {"settings": settings, "runs": report.get("runs", []), "wall_s": report.get("wall_s", 0.0)}
    cache, t0 = a.out / "cache", time.perf_counter()
    methods = ablation_methods()
    if q:                                                   # plumbing: one of each kind of method
        methods = {n: s for n, s in methods.items() if n in [f"{m} k=20" for m in HEADLINE + ("SPLAM authors",
                   "u-ablation half", "DL half")] + ["LCM k=100 noME"]}
    first = {n: s for n, s in methods.items() if n.rsplit(" k=", 1)[0] in HEADLINE}
    rest = {n: s for n, s in methods.items() if n not in first}
    seeds = range(settings["seeds"])
    tasks = [{"args": settings, "teacher": "exact", "width": 128, "seed": s, "methods": m}
             for m in (first, rest) for s in seeds]
    if not a.report:
        with ProcessPoolExecutor(a.workers) as pool:
            list(pool.map(_pretrain, [(cache, settings["pretrain_iters"], s, 128) for s in seeds]))
        run_tasks(tasks, report, path, a.workers, cache)
    report["wall_s"] += 0 if a.report else time.perf_counter() - t0
    fixed_points(report, cache)
    report["summary"] = summary(report)
    report["baselines"] = reference_rows(settings, seeds, cache)
    report["command"] = f"python toy/study.py --ablations{' --quick' if q else ''}"
    report["table"] = modes_table(report["summary"])
    report["baseline_table"] = baseline_table(report["baselines"])
    report["delta_table"] = delta_table(report["runs"])
    save(path, report)
    if not q and a.out == RESULTS:
        st = report["settings"]
        write_readme(report, RESULTS / "README.md", "ablations", report["command"] + " --report", "\n".join([
            f"Settings: the main study's ({st['iters']:,} iterations at a constant AdamW lr {st['lr']:g}, batch "
            f"{st['batch']}, w = {st['w']}, L2, EMA 0.95, exact teacher, 128-wide student), seeds 0-{st['seeds'] - 1}, "
            f"{st['n_eval']:,} evaluation noises. {len(report['runs'])} runs, "
            f"{sum(r['wall_s'] for r in report['runs']) / 60:.0f} core-minutes (`{report['command']}`, 2 workers, "
            "beside other jobs). Each run's final EMA student is kept in the git-ignored toy/results/cache/students/.",
            "", report["table"], "", "Training-free solvers and the undistilled checkpoint on the same evaluation sets "
            "(mean ± std over the seeds):", "", report["baseline_table"], "",
            "δ(t) (Fig. 2c): ‖F(x_t, t) − F(x_{t−20}, t−20)‖ with x_{t−20} the teacher's ODE solution from x_t (*ODE*) or "
            "the same x0 and noise (*same noise*, the paper's simulation), 1,000 points, mean ± std over seeds:", "",
            report["delta_table"]]))
    print(report["table"])
    return report


def baseline_table(baselines):
    """Markdown: DDIM, DPM-Solver++(2M) and the undistilled checkpoint, as the ablation table scores methods."""
    f = lambda v, d=3: f"{torch.tensor(v).mean():.{d}f} ± {torch.tensor(v).std() if len(v) > 1 else 0:.{d}f}"  # noqa: E731
    lines = ["| sampler | 1-step error | NLL excess 1 / 2 / 4 steps (nats) | mode split 1 / 2 / 4 steps |", "|---|---|---|---|"]
    for name, rs in baselines.items():
        col = lambda m, d=3: f([r[m] for r in rs], d)  # noqa: E731
        lines.append(f"| {name} | {col('err_1step')} | {col('nll_1', 2)} / {col('nll_2', 2)} / {col('nll_4', 2)} | "
                     f"{col('split_1')} / {col('split_2')} / {col('split_4')} |")
    return "\n".join(lines)


DELTA_T = (119, 299, 499, 699, 899, 999)


def delta_table(runs):
    """Markdown: delta(t) at a few t for the headline methods, ODE and same-noise, mean ± std over seeds."""
    ts = [t for t in DELTA_T if runs and t in runs[0]["delta"]["t"]] or runs[0]["delta"]["t"]   # --quick: fewer t
    lines = ["| method | δ | " + " | ".join(f"t = {t}" for t in ts) + " |", "|---|---|" + "---|" * len(ts)]
    for m in [f"{h} {k}" for k in ("k=20", "k=100 ME") for h in HEADLINE]:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        for kind in ("ode", "same_noise"):
            v = torch.tensor([[r["delta"][kind][r["delta"]["t"].index(t)] for t in ts] for r in rs], dtype=torch.float64)
            sd = v.std(0) if len(rs) > 1 else torch.zeros(len(ts))
            lines.append(f"| {m} | {kind.replace('_', ' ')} | " + " | ".join(f"{a:.3f} ± {b:.3f}" for a, b in zip(v.mean(0), sd)) + " |")
    return "\n".join(lines)


def reference_rows(settings, seeds, cache):
    """What distillation is measured against, per seed: diffusers' DDIM and DPM-Solver++(2M) at 1, 2 and 4 steps
    (training-free), and the undistilled pre-trained checkpoint sampled with the consistency sampler."""
    out = {}
    for s in seeds:
        pre, ev = evaluation_set(settings, "exact", 128, s, cache)
        rows = {**t2.baselines(ev, ev.sched), "pre-trained (no distillation)": t2.evaluate(pre, ev, ev.sched, s)}
        for name, r in rows.items():
            out.setdefault(name, []).append({"seed": s, **r})
    return out


def modes_table(rows):
    """Markdown: the 1-step error and the mode metric (NLL excess, mode split) at 1, 2 and 4 steps, with floors."""
    f = lambda s, d=3: f"{s['mean']:.{d}f} ± {s['std']:.{d}f}"
    lines = ["| method | 1-step error | NLL excess 1 / 2 / 4 steps (nats) | mode split 1 / 2 / 4 steps | floors: NLL, split |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {f(r['err_1step'])} | {f(r['nll_1'], 2)} / {f(r['nll_2'], 2)} / {f(r['nll_4'], 2)} | "
                     f"{f(r['split_1'])} / {f(r['split_2'])} / {f(r['split_4'])} | {r['nll_floor']['mean']:.3f}, "
                     f"{r['split_floor']['mean']:.3f} |")
    return "\n".join(lines)


def doubling(report, budgets):
    """Markdown: each method's final 1-step error at every annealed budget, the change from the budget before (the
    plateau test: converged when doubling changes it by less than 5%), the lowest error on its training curve (1,000
    noises; where it was, as a share of the budget: a late rise shows as a low share), and the smallest budget at
    which LCM is as good (how many more iterations the method needs than LCM; Fig. 2a's question)."""
    tag = lambda n: f"cos{n // 1000 if n >= 1000 else n}{'k' * (n >= 1000)}"
    by = {r["method"]: r for r in report["summary"]}
    err = lambda m, n: by[f"{m} {tag(n)}"]["err_1step"]["mean"] if f"{m} {tag(n)}" in by else None
    f = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})"

    def lowest(name):                                  # mean over seeds of the curve's minimum, and where it was
        cs = [r["curve"] for r in report["runs"] if r["method"] == name]
        at = [min(range(len(c["err_1"])), key=c["err_1"].__getitem__) for c in cs]
        return (sum(c["err_1"][i] for c, i in zip(cs, at)) / len(cs),
                sum(c["iter"][i] / c["iter"][-1] for c, i in zip(cs, at)) / len(cs))

    lines = ["| method | budget (its) | final 1-step error | vs LCM | change from half the budget | converged (< 5%) "
             "| lowest on the curve (at) | LCM as good by (its) |", "|---|---|---|---|---|---|---|---|"]
    for m in ("LCM k=20", "SPLAM best k=20", "SPLAM paper k=20", "u-ablation half k=20", "u-ablation k=20"):
        for i, n in enumerate(budgets):
            e, lcm, prev = err(m, n), err("LCM k=20", n), err(m, budgets[i - 1]) if i else None
            if e is None:
                continue
            ratio = f"{e / lcm:.2f}×" if lcm else "n/a"
            plateau = f"{100 * (e - prev) / prev:+.1f}% | {abs(e - prev) / prev < 0.05}" if prev else "  | "
            low, at = lowest(f"{m} {tag(n)}")
            match = [b for b in budgets if err("LCM k=20", b) is not None and err("LCM k=20", b) <= e]
            match = ("–" if m.startswith("LCM") else ("≤ " if match[0] == budgets[0] else "") + f"{match[0]:,}" if match
                     else "not within the budgets measured")
            lines.append(f"| {m} | {n:,} | {f(by[f'{m} {tag(n)}']['err_1step'])} | {ratio} | {plateau} | "
                         f"{low:.3f} ({100 * at:.0f}%) | {match} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budget, 1 seed, 2 variants: checks the plumbing only")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ablations", action="store_true", help="the headline methods re-measured with the mode metric, "
                   "and the ablations (u, DL, closed-form sigma, each at gamma-share 0 and 0.5; k=100 without ME): "
                   "study2d_ablations.json")
    p.add_argument("--remeasure", action="store_true", help="--anneal: rerun the runs saved before the mode metric "
                   "(their 1-step error is reproduced exactly) to add it and keep their students")
    p.add_argument("--report", action="store_true", help="only summarise the runs already in the JSON (table, figure)")
    p.add_argument("--anneal", action="store_true", help="the convergence check: LCM and both SPLAMs (k=20, exact "
                   "teacher) with the lr cosine-decayed to 0 over each of --budgets (study2d_anneal.json)")
    p.add_argument("--budgets", default="10000,20000", help="--anneal: iteration budgets, each double the one before; "
                   "runs already in the JSON are kept, so a longer budget can be added later")
    p.add_argument("--lr", type=float, default=LR, help="--anneal: the peak lr (same for every method); a value other "
                   "than the main study's writes study2d_anneal_lr<lr>.json")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.lr <= 0 or (a.lr != LR and not a.anneal):
        p.error("--lr takes a positive value, and only with --anneal (the main study's lr is fixed)")
    q = a.quick
    settings = {"screen_iters": 20 if q else 5000, "iters": a.iters or (20 if q else 10000),
                "eval_every": 10 if q else 250, "lr": a.lr, "batch": 256, "w": 3.0, "n_eval": 200 if q else 16000,
                "pretrain_iters": 50 if q else 4000, "long_iters": 40 if q else 30000, "seeds": a.seeds or (1 if q else 3), "widths": [128] if q else [128, 256]}
    a.out.mkdir(parents=True, exist_ok=True)
    if a.anneal and a.ablations:
        p.error("--anneal and --ablations are separate studies: give one")
    if a.anneal:
        return anneal_study(a, settings)
    if a.ablations:
        return ablation_study(a, settings)
    path = a.out / ("study2d_quick.json" if q else "study2d.json")
    report = json.loads(path.read_text()) if path.is_file() else {}
    if report.get("settings", settings) != settings:
        raise SystemExit(f"{path} holds a study with other settings; move it away or pass the same settings")
    report = {"settings": settings, "runs": report.get("runs", []), "wall_s": report.get("wall_s", 0.0)}
    t0 = time.perf_counter()
    cmd = f"python toy/study.py{' --quick' if q else ''}"

    # Phase 1: screen the gamma-path variants (seed 0, exact teacher, width 128, k = 20)
    variants = screen_variants()
    if q:
        variants = dict(list(variants.items())[:2])
    cache = a.out / "cache"
    with ProcessPoolExecutor(a.workers) as pool:                        # pre-train every (seed, width) once
        list([] if a.report else pool.map(_pretrain, [(cache, settings["pretrain_iters"], s, w)
                                  for s in range(settings["seeds"]) for w in settings["widths"]]))
    run_tasks([] if a.report else [{"args": {**settings, "iters": settings["screen_iters"]}, "teacher": "exact", "width": 128, "seed": 0,
                "methods": {f"{n} k=20": {**s, "k": 20} for n, s in variants.items()}}], report, path, a.workers, cache)
    screen = [r for r in report["runs"] if r["method"].startswith("SPLAM ") and "share=" in r["method"]]
    best = min(screen, key=lambda r: r["err_1step"])
    best_spec = {k: v for k, v in best["spec"].items() if k != "k"}
    report["best_variant"] = {"method": best["method"], "spec": best_spec}

    # Phase 2: the main comparison on every seed
    methods = {"LCM": dict(objective="lcm"), "SPLAM paper": PAPER, "SPLAM best": best_spec,
               "DL": dict(objective="dl", gamma_features=best_spec["gamma_features"], gamma_one_share=0.0)}
    ks = {"k=20": dict(k=20), "k=100 ME": dict(k=100)}
    main_set = {f"{m} {kn}": {**s, **kv} for m, s in methods.items() for kn, kv in ks.items()}
    k20 = {n: main_set[n] for n in ("LCM k=20", "SPLAM best k=20", "SPLAM paper k=20", "DL k=20")}
    u_abl = {f"u-ablation {kn}": {"objective": "splam", "gamma_one_share": 0.0, "u_ablation": True, **kv}
             for kn, kv in ks.items()}
    seeds = range(settings["seeds"])
    wide = {n: v for n, v in k20.items() if not n.startswith("DL")}       # capacity: LCM vs the two SPLAMs
    long = {f"{n} long": main_set[n] for n in ("LCM k=20", "SPLAM best k=20")}   # 3x budget: has it plateaued?
    tasks = ([{"args": settings, "teacher": "exact", "width": 128, "seed": s, "methods": {**main_set, **u_abl}}
              for s in seeds]
             + [{"args": settings, "teacher": "learned", "width": 128, "seed": s, "methods": k20} for s in seeds]
             + [{"args": {**settings, "iters": settings["long_iters"]}, "teacher": "exact", "width": 128, "seed": s,
                 "methods": long} for s in seeds]
             + [{"args": settings, "teacher": "exact", "width": w, "seed": s, "methods": wide}
                for w in settings["widths"][1:] for s in seeds])
    if not a.report:
        run_tasks(tasks, report, path, a.workers, cache)

    report["wall_s"] += 0 if a.report else time.perf_counter() - t0
    fixed_points(report, cache)
    report["summary"] = summary(report)
    report["command"] = cmd
    report["table"] = table(report["summary"], "main")
    report["screen_table"] = table(report["summary"], "screen")
    save(path, report)
    plot(report, a.out / ("study2d_quick.png" if q else "study2d.png"))
    if not q and a.out == RESULTS:
        write_readme(report, RESULTS / "README.md")
    print("\nScreen (seed 0, exact teacher, width 128, k=20):\n" + report["screen_table"])
    print(f"\nbest variant: {best['method']}\n\n" + report["table"])
    print(f"\nwrote {path} in {report['wall_s']:.0f}s of wall time ({cmd})")
    return report


if __name__ == "__main__":
    main()
