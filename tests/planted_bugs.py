"""Planted bugs: does the fast part of the suite catch the mistakes that matter? Run by hand, not in CI.

    python tests/planted_bugs.py              # every bug, about 20 s each on 2 cores
    python tests/planted_bugs.py --only ema   # the bugs whose name contains "ema"

Each bug is one textual edit of `minisplam.py`. The tool copies the project's tracked files to a temporary folder,
applies one edit there (never here), runs FAST_TESTS against the copy (PYTHONPATH points at it) and prints which
tests failed. A bug that no test fails on is "NOT CAUGHT" and the tool exits with 1. The unedited copy is run
first: the fast tests must pass there, or nothing the table says would mean anything.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_TESTS = ["tests/test_core.py", "tests/test_toy2d.py", "-k", "not study and not smoke",
              "tests/test_sd.py::test_sd_step_teacher_solve_is_diffusers_guided_ddim",
              "tests/test_sd.py::test_sd_step_latents_are_the_pipelines_scaled_vae_latents",
              "tests/test_sd.py::test_gamma_path_is_timestep_cond_and_vanishes_at_one",
              "tests/test_sdxl_lora.py::test_sdxl_sd_step_teacher_solve_is_diffusers_guided_ddim",
              "tests/test_sd.py::test_sd_step_hands_teacher_student_and_target_as_eq17_says",
              "tests/test_sd.py::test_train_hands_sd_step_the_default_config_and_optimizer"]

# name -> (what the correct code says, what the bug makes of it); each `old` must occur exactly once
BUGS = {
    "target at t instead of t-k": (
        "tgt = consistency_fn(x_s, target(x_s, s, cond, ones), s, alpha_s, sigma_s)",
        "tgt = consistency_fn(x_s, target(x_s, t, cond, ones), t, alpha_s, sigma_s)"),
    "no EMA update": (
        "        ema_update(*ema, cfg.ema_mu)", "        pass"),
    "VAE scaling factor dropped": (
        ".latent_dist.sample(generator).float() * sd.pipe.vae.config.scaling_factor",
        ".latent_dist.sample(generator).float()"),
    "cond and uncond swapped in sd_step": (
        "z0, cond, uncond, sd.sched, cfg, opt,", "z0, uncond, cond, sd.sched, cfg, opt,"),
    "w ignored (guidance off)": (
        "return eps_u + w * (eps_c - eps_u)", "return eps_c"),
    "gamma and 1 - gamma swapped in the SL point": (
        "x = (1 - gamma) * (alpha_t / alpha_s) * x_s + gamma * x_t",
        "x = gamma * (alpha_t / alpha_s) * x_s + (1 - gamma) * x_t"),
    "sigma' built with alpha(t) instead of sigma(t)": (
        "return (1 - gamma) * alpha_t / alpha_s * sigma_s + gamma * sigma_t",
        "return (1 - gamma) * alpha_t / alpha_s * sigma_s + gamma * alpha_t"),
    "boundary scalings of the target at t instead of t-k": (
        "tgt = consistency_fn(x_s, target(x_s, s, cond, ones), s, alpha_s, sigma_s)",
        "tgt = consistency_fn(x_s, target(x_s, s, cond, ones), t, alpha_s, sigma_s)"),
    "sampler's timesteps off by one k_phi step": (
        "return [grid[i] for i in idx]", "return [grid[i] - T // original_steps for i in idx]"),
    "one DDIM step too few in multiple estimation": (
        "n = int(math.ceil(int((t - s).max()) / step))", "n = int(math.ceil(int((t - s).max()) / step)) - 1"),
    "gradient not clipped": (
        "norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)",
        "norm = torch.nn.utils.clip_grad_norm_(params, float('inf'))"),
    "gamma path not zero at gamma = 1": (
        "return phi(g) - phi(torch.ones_like(g))", "return phi(g)"),
    "x_t noised with sigma(t-k)": (
        "x_t = alpha_t * x0 + sigma_t * noise", "x_t = alpha_t * x0 + sigma_s * noise"),
    # issue 31: how sd_step wires the networks, inside splad_loss, the defaults (each class passed the suite before)
    "sd_step: a full run's target is the online student, not its EMA copy": (
        "unet_eps(target, sd.sched, sd.prediction_type, gamma_kind=kind, amp=amp)",
        "unet_eps(online, sd.sched, sd.prediction_type, gamma_kind=kind, amp=amp)"),
    "sd_step: a LoRA run's teacher keeps its adapters on": (
        "adapters=not lora, amp=amp)", "adapters=True, amp=amp)"),
    "sd_step: the student without its gamma": (
        "loss = splad_step(unet_eps(online, sd.sched, sd.prediction_type, gamma_kind=kind, amp=amp),",
        "loss = splad_step(unet_eps(online, sd.sched, sd.prediction_type, amp=amp),"),
    "splad_loss: the target at the drawn gamma, not at gamma = 1": (
        "target(x_s, s, cond, ones)", "target(x_s, s, cond, gamma)"),
    "splad_loss: no stop-gradient on the target (a LoRA run's target is the student)": (
        "    with torch.no_grad():\n        ones = torch.ones_like(gamma)\n",
        "    if True:\n        ones = torch.ones_like(gamma)\n"),
    "SPLADConfig: EMA rate 0.995, not Appendix A's 0.95": (
        "ema_mu: float = 0.95", "ema_mu: float = 0.995"),
    "train: LCM's max_grad_norm 1.0 as the default, not Appendix A's 10": (
        'default=10.0, help="gradient clipping (Appendix A)"', 'default=1.0, help="gradient clipping (Appendix A)"'),
    "train: AdamW with betas (0.9, 0.99)": (
        "lr=args.lr, weight_decay=args.weight_decay)", "lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))"),
}


def run_fast_tests(copy: Path) -> tuple:
    """(failed test ids, seconds) of FAST_TESTS in the copy."""
    env = {**os.environ, "PYTHONPATH": str(copy), "CI": "true", "MPLBACKEND": "Agg"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "-o", "addopts=",
                          *FAST_TESTS], cwd=copy, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", out.stdout, re.M)
    if out.returncode not in (0, 1) or (out.returncode == 1 and not failed):
        raise RuntimeError(f"pytest did not run (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return failed, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="run only the bugs whose name contains this text")
    a = p.parse_args(argv)
    source = (ROOT / "minisplam.py").read_text()
    bugs = {n: b for n, b in BUGS.items() if a.only.lower() in n.lower()}
    for name, (old, _) in bugs.items():
        if source.count(old) != 1:
            raise SystemExit(f"error: the text that bug {name!r} edits is found {source.count(old)} times in "
                             f"minisplam.py (must be once): update BUGS")
    with tempfile.TemporaryDirectory(prefix="planted-bugs-") as tmp:
        copy = Path(tmp) / "minisplam"
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, copy / f)
        failed, s = run_fast_tests(copy)
        print(f"no bug: {len(failed)} failed ({s:.0f} s)" + (f": {failed}" if failed else ""), flush=True)
        if failed:
            raise SystemExit("error: the fast tests fail on the unedited code; fix that first")
        rows = []
        for name, (old, new) in bugs.items():
            (copy / "minisplam.py").write_text(source.replace(old, new))
            failed, s = run_fast_tests(copy)
            rows.append((name, failed))
            print(f"{name}: {'caught' if failed else 'NOT CAUGHT'} by {len(failed)} test(s) ({s:.0f} s)", flush=True)
        (copy / "minisplam.py").write_text(source)
    print("\n| planted bug | caught | by (first 3 of the failing tests) |\n|---|---|---|")
    for name, failed in rows:
        short = ", ".join(f.split("::")[-1] for f in failed[:3]) + (f" (+{len(failed) - 3})" if len(failed) > 3 else "")
        print(f"| {name} | {'yes' if failed else '**no**'} | {short} |")
    missed = [n for n, f in rows if not f]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} caught" + (f"; NOT caught: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
