"""toy/palette.py: every method the figures can show has its family's colour; variants differ by style only."""

import json
from pathlib import Path

import pytest

from toy import palette

RESULTS = Path(__file__).resolve().parent.parent / "toy" / "results"


def committed_method_names():
    names = set()
    for f in RESULTS.glob("*.json"):
        d = json.loads(f.read_text())
        names |= {r["method"] for r in d.get("runs", []) if isinstance(r, dict) and "method" in r}
        names |= set(d.get("baselines") or {})
    for f in RESULTS.glob("image_toy_full*/image_toy.json"):
        d = json.loads(f.read_text())
        names |= set(d["results"]) | set(d.get("curves") or {})
    return names


def test_every_committed_and_demo_method_has_a_colour():
    from toy import toy2d

    names = committed_method_names() | set(toy2d.METHODS) | {"pre-trained (no distil)", "not distilled"}
    assert len(names) > 30
    for name in names:
        assert palette.color(name) in palette.COLORS.values(), name


def test_one_colour_per_family_and_styles_per_variant():
    assert len(set(palette.COLORS.values())) == len(palette.COLORS)
    fam = {"LCM k=100 noME": "LCM", "SPLAM k=20": "SPLAM ours", "SPLAM best k=100 ME": "SPLAM ours",
           "SPLAM ours k=20": "SPLAM ours", "SPLAM paper k=20 cos80k": "SPLAM paper",
           "SPLAM authors half k=20": "SPLAM authors", "SPLAM authors share=0.0 k=20": "SPLAM paper",
           "SPLAM fourier4 share=0.5 k=20": "SPLAM ours", "DL half k=100 ME": "DL", "u-ablation half k=20": "u-ablation",
           "teacher ODE (100 steps)": "teacher", "DPM-Solver++(2M)": "DPM-Solver++(2M)", "AMED-Solver": "AMED-Solver",
           "pre-trained (no distillation)": "not distilled"}
    assert {n: palette.family(n) for n in fam} == fam
    assert [palette.linestyle(f"LCM {k}") for k in ("k=20", "k=100 ME", "k=100 noME")] == ["-", "--", ":"]
    assert palette.marker("DL half k=20") and not palette.marker("DL k=20")
    assert palette.color("DL half k=20") == palette.color("DL k=100 ME")
    with pytest.raises(KeyError):
        palette.color("GAN")
