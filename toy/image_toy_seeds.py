"""The image toy's long run over seeds: LCM against SPLAM, paired by seed. Each seed trains its own teacher and its
own FD-proxy classifier, so FD-proxy values compare only within a seed; the table gives each method's mean ± std and
the paired difference SPLAM - LCM. A seed may have run on another device (`--device cuda`): the algorithm and
settings are the same, only the random streams differ, as they do between seeds.

    python toy/image_toy.py --full --seed 1     # one run per seed (seed 0: --full); toy/results/image_toy_full*
    python toy/image_toy_seeds.py               # writes toy/results/image_toy_seeds.json, _curve.png, the table of toy/results/README.md
"""

import json
from pathlib import Path

from toy.image_toy import FULL_OUT, plot_curves
from toy.study import write_readme
from toy.toy2d import mean_std

LCM, SPLAM = "LCM (k=100)", "SPLAM (k=100)"
SOLVERS = ("DDIM", "DPM-Solver++(2M)", "UniPC", "iPNDM", "AMED-Solver")


def fmt(vals):
    return "{:.1f} ± {:.1f}".format(*mean_std(vals))


def load_runs(root: Path = FULL_OUT.parent) -> dict:
    """{seed: that seed's image_toy.json, with its FD-proxy floor (None where not computed)}."""
    runs = {}
    for f in sorted(root.glob(f"{FULL_OUT.name}*/image_toy.json")):
        r = json.loads(f.read_text())
        floor = f.with_name("fd_floor.json")                              # python toy/image_toy_floor.py --seed N
        r["fd_floor"] = json.loads(floor.read_text())["fd_proxy_real_vs_real"] if floor.is_file() else None
        runs[int(r["settings"]["seed"])] = r
    return runs


def main(root: Path = FULL_OUT.parent, readme: Path = Path(__file__).resolve().parent / "results" / "README.md"):
    runs = load_runs(root)
    run_settings = lambda r: {k: v for k, v in r["settings"].items() if k not in ("seed", "out", "threads", "device")}
    settings = run_settings(runs[0])
    for s, r in runs.items():                                          # the same run on every seed
        assert run_settings(r) == settings, f"seed {s} was run with other settings: {run_settings(r)}"
    seeds = sorted(runs)
    fd = lambda s, m, n: runs[s]["results"][m][str(n)]["fd_proxy"]
    err = lambda s, m, n: runs[s]["results"][m][str(n)]["err_to_ode"]
    rows = []
    lines = [f"| NFE | LCM FD-proxy | SPLAM FD-proxy | SPLAM − LCM (paired) | SPLAM better | best solver's FD-proxy "
             f"| LCM error to ODE | SPLAM error to ODE |", "|---|---|---|---|---|---|---|---|"]
    for n in (1, 2, 3, 4, 5, 8):
        lcm, spl = [fd(s, LCM, n) for s in seeds], [fd(s, SPLAM, n) for s in seeds]
        diff = [b - a for a, b in zip(lcm, spl)]
        solver = [min(fd(s, m, n) for m in SOLVERS if str(n) in runs[s]["results"][m]) for s in seeds] if n > 1 else []
        e_l, e_s = [err(s, LCM, n) for s in seeds], [err(s, SPLAM, n) for s in seeds]
        rows.append({"nfe": n, "lcm_fd": lcm, "splam_fd": spl, "splam_minus_lcm": diff, "best_solver_fd": solver,
                     "lcm_err": e_l, "splam_err": e_s})
        lines.append(f"| {n} | {fmt(lcm)} | {fmt(spl)} | {fmt(diff)} | {sum(d < 0 for d in diff)}/{len(seeds)} | "
                     f"{fmt(solver) if solver else '–'} | {mean_std(e_l)[0]:.3f} | {mean_std(e_s)[0]:.3f} |")
    wall = {s: runs[s]["timing"]["total_s"] / 60 for s in seeds}
    device = {s: runs[s]["settings"].get("device", "cpu") for s in seeds}
    report = {"seeds": seeds, "settings": settings, "rows": rows, "wall_min": wall, "device": device,
              "teacher_fd_proxy": {s: runs[s]["teacher_fd_proxy"] for s in seeds},
              "fd_floor": {s: runs[s]["fd_floor"] for s in seeds},
              "command": "python toy/image_toy_seeds.py", "table": "\n".join(lines)}
    out = root / "image_toy_seeds.json"
    out.write_text(json.dumps(report, indent=1))
    if all("curves" in r for r in runs.values()):
        plot_curves([r["curves"] for _, r in sorted(runs.items())], f"{len(runs)} seeds,",
                    root / "image_toy_seeds_curve.png")
    where = "; ".join(f"seed {s}: {device[s]}, {wall[s]:.0f} min" for s in seeds)
    block = (f"Seeds {', '.join(map(str, seeds))} of `python toy/image_toy.py --full [--seed N] [--device cuda]` "
             f"(device and wall time: {where}), summarised by "
             f"`{report['command']}` into [`toy/results/image_toy_seeds.json`](image_toy_seeds.json). "
             f"Mean ± std over seeds; *SPLAM better*: seeds on which SPLAM's FD-proxy is lower than LCM's; the teacher's "
             f"own 100-step ODE samples score {fmt(list(report['teacher_fd_proxy'].values()))}"
             + (f"; the FD-proxy's noise floor (disjoint sets of real digits, `python toy/image_toy_floor.py --seed N`) "
                f"is {fmt([v for s in seeds for v in runs[s]['fd_floor']])}" if all(runs[s]["fd_floor"] for s in seeds) else "")
             + ".\n\n" + report["table"])
    write_readme(report, readme, "imageseeds", report["command"], block)
    print(block)
    return report


if __name__ == "__main__":
    main()
