"""One colour per method family, for every figure (the toys, the study, the notebooks).

    from toy import palette
    ax.plot(x, y, label=name, **palette.style(name))     # colour by family, line style / marker by variant

The family comes from the method's name as the code and the committed JSON spell it. Within a family the variants
differ by line style (k=20 solid, k=100 with multiple estimation dashed, k=100 without it dotted) and by a marker
(the "half" variants: half of the gammas drawn at exactly 1), never by colour.
"""

COLORS = {
    "teacher": "#000000",           # the teacher's ODE (reference samples)
    "LCM": "#1f77b4",               # blue
    "SPLAM ours": "#ff7f0e",        # orange: sigma', half of the gammas at 1 (minisplam's default; the study's "best")
    "SPLAM paper": "#d62728",       # red: the paper's text, sigma', gamma ~ U[0, 1]
    "SPLAM authors": "#8c564b",     # brown: the authors' script, Eq. 24's closed-form sigma, gamma ~ U[0, 1]
    "DL": "#2ca02c",                # green: the DL-ODE ablation (Eq. 26-28)
    "u-ablation": "#9467bd",        # purple: given the effective time u(gamma, t)
    "DDIM": "#525252",              # the training-free solvers
    "DPM-Solver++(2M)": "#bcbd22",
    "UniPC": "#17becf",
    "iPNDM": "#e377c2",
    "AMED-Solver": "#393b79",
    "not distilled": "#a8a8a8",     # the pre-trained checkpoint, sampled with the consistency sampler
}

# The 2D toy's two classes in scatter plots of samples: colours no method uses, so a colour never means two things.
CLASS_COLORS = ("#404040", "#e7298a")   # class 0 (the even modes): dark grey; class 1 (the odd modes): magenta

_PREFIXES = (  # (name prefix, family), first match wins
    ("teacher", "teacher"), ("LCM", "LCM"), ("SPLAM authors", "SPLAM authors"), ("SPLAM paper", "SPLAM paper"),
    ("SPLAM", "SPLAM ours"), ("DL", "DL"), ("u-ablation", "u-ablation"), ("DDIM", "DDIM"),
    ("DPM-Solver++", "DPM-Solver++(2M)"), ("UniPC", "UniPC"), ("iPNDM", "iPNDM"), ("AMED", "AMED-Solver"),
    ("not distilled", "not distilled"), ("pre-trained", "not distilled"),
)


def family(name: str) -> str:
    """The family of a method name: "LCM k=100 ME" -> "LCM", "SPLAM best k=20" -> "SPLAM ours", ...
    The gamma screen of toy/results/study2d.json ("SPLAM <features> share=S k=20") goes by its gamma distribution:
    share 0 is the paper's, a share at gamma = 1 is ours."""
    if name.startswith("SPLAM") and "share=" in name:
        return "SPLAM paper" if float(name.split("share=")[1].split()[0]) == 0 else "SPLAM ours"
    for prefix, fam in _PREFIXES:
        if name.startswith(prefix):
            return fam
    raise KeyError(f"no colour for method {name!r}: add its family to toy/palette.py")


def color(name: str) -> str:
    """The colour of a method: one per family (COLORS)."""
    return COLORS[family(name)]


def linestyle(name: str) -> str:
    """k=20 (and anything else) solid, k=100 with multiple estimation dashed, k=100 without it dotted."""
    return ":" if "noME" in name else "--" if "k=100" in name else "-"


def marker(name: str):
    """A marker for the "half" variants (half of the gammas at exactly 1), none otherwise."""
    return "o" if " half" in name else None


def style(name: str) -> dict:
    """Keyword arguments for Axes.plot / errorbar: colour, line style and (for "half") a sparse marker."""
    out = {"color": color(name), "ls": linestyle(name)}
    if marker(name):
        out.update(marker=marker(name), markevery=0.1, ms=4)
    return out
