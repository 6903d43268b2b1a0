"""The Stable Diffusion path learns, not only runs.

A tiny SD UNet trained on captioned coloured shapes (toy/shapes_sd.py) is the teacher; `python minisplam.py train`
distils it through the unchanged CLI (VAE latents, CLIP conditioning, sd_step, mixed precision, the EMA target).
The distilled student's coupled few-step error to the teacher's guided ODE (toy.measure.few_step_errors) must fall
clearly below the untrained student's (the teacher itself used as a few-step sampler).

The teacher is committed (tests/data/shapes_teacher, 3.9 MB), trained for 1,500 steps by
`python toy/shapes_sd.py OUT --steps 1500 --resolution 8 --n 512 --batch 32 --threads 1` (OUT/teacher): long enough
that its guided ODE output depends clearly on the prompt (another prompt moves it by 0.34 of its norm; the 300-step
teacher of benchmarks/learning_curve.py: 0.13), and nothing is trained at test time.

Margins, with this teacher: trained / untrained, LCM k=100 with multiple estimation at step 50: 1-step 0.869 (bf16
0.875), 4-step 0.436 (bf16 0.433); SPLAM's held-out SPLAD loss at step 50: 0.521 (0.431 at step 100). With the
300-step teacher of benchmarks/learning_curve.py (3 seeds): 1-step 0.848-0.853, 4-step 0.236-0.259, SPLAM
0.594-0.708 at step 100. Deliberate bugs gave 1-step ratios of 0.965 (VAE scaling dropped) to exactly 1 (target at t
instead of t - k; no EMA update); those and guidance errors are caught exactly by tests/test_core.py and
tests/test_sd.py (tests/planted_bugs.py).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import minisplam as ms
from toy import measure
from toy import shapes_sd as sh

RES, W = 8, 3.0
TEACHER = Path(__file__).parent / "data" / "shapes_teacher"
LCM_STEPS, MAX_RATIO = 50, {1: 0.93, 4: 0.5}        # LCM: trained / untrained coupled error, 1 and 4 steps
SPLAM_STEPS, MAX_LOSS_RATIO = 50, 0.8              # SPLAM: trained / untrained held-out SPLAD loss


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shutil.copytree(TEACHER, root / "teacher")                  # a copy: the tests never touch the committed one
    sh.write_imagefolder(root / "data", 256, RES, seed=1)
    ref = sh.reference(str(root / "teacher"), sh.CAPTIONS * 4, W, resolution=RES)
    return root, ref, sh.run_errors(str(root / "teacher"), *ref)


def _distil(root, run, objective, steps, precision="no"):
    ms.main(["train", "--teacher", str(root / "teacher"), "--data", str(root / "data"), "--output-dir", str(run),
             "--objective", objective, "--k", "100", "--mixed-precision", precision, "--resolution", str(RES),
             "--batch-size", "16", "--lr", "5e-4", "--w", str(W), "--max-steps", str(steps),
             "--checkpoint-every", str(steps), "--validate-every", "0", "--num-workers", "0"])
    return run


def test_the_shapes_teacher_depends_on_the_prompt(shapes):
    """Otherwise 'learning' could mean learning one unconditional map."""
    root, (sd, x_T, cond, ode), _ = shapes
    ref = ode(x_T, sd.sched.T - 1)
    swapped = measure.ode_sample(ms.unet_eps(sd.unet, sd.sched, sd.prediction_type), x_T, cond.roll(1, 0),
                            ms.encode_prompts(sd, [""], "cpu").expand_as(cond), W, sd.sched, 100)
    gap = (ref - swapped).flatten(1).norm(dim=1).mean()
    print(f"same noise, another prompt: |ODE output difference| = {gap:.3f} (output norm "
          f"{ref.flatten(1).norm(dim=1).mean():.3f})")
    assert gap > 0.25 * ref.flatten(1).norm(dim=1).mean()               # measured 0.34 (the 300-step teacher: 0.13)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_lcm_student_gets_closer_to_the_teacher_ode(shapes, tmp_path, precision):
    root, ref, before = shapes
    after = sh.run_errors(str(_distil(root, tmp_path / "run", "lcm", LCM_STEPS, precision)), *ref)
    print(f"{precision}: coupled error untrained {before}, after {LCM_STEPS} steps {after}")
    for n, r in MAX_RATIO.items():
        assert after[n] < r * before[n], (n, before, after)


def test_splam_heldout_loss_falls(shapes, tmp_path):
    """SPLAM's gamma = 1 network may first get worse (the transient of the convergence study); its objective, the
    held-out SPLAD loss on shapes the run never saw, must fall within the budget."""
    root, (sd, *_), _ = shapes
    run = _distil(root, tmp_path / "run", "splam", SPLAM_STEPS)
    cfg = ms.splad_config(json.loads((run / "config.json").read_text()))
    before, after = (sh.heldout_loss(str(p), sd, cfg, resolution=RES) for p in (root / "teacher", run))
    print(f"SPLAM held-out SPLAD loss: untrained {before:.4f}, after {SPLAM_STEPS} steps {after:.4f}")
    assert after < MAX_LOSS_RATIO * before


def test_learning_curve_benchmark_quick_runs_and_resumes(tmp_path):
    """benchmarks/learning_curve.py: plumbing only (segments with --resume, measurements, JSON, figure, rerun)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_curve", Path(__file__).parents[1] / "benchmarks" /
                                                  "learning_curve.py")
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    rep = lc.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    (run,) = rep["runs"]
    assert [c["step"] for c in run["curve"]] == [0, 2, 4] and len(run["delta"]["ode"]) == len(run["delta"]["t"])
    assert (tmp_path / "learning_curve_quick.png").stat().st_size > 10_000
    assert lc.main(["--quick", "--workers", "1", "--out", str(tmp_path)])["runs"] == rep["runs"]   # nothing rerun
