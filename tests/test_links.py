"""Every link in the READMEs and in the notebooks' markdown cells works in a clone of the repository: a relative link
points at a file or folder that exists, inside the repository; anything else is a public web address (http(s)://)."""

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(p for p in [ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("*/*/README.md"),
                          *ROOT.glob("notebooks/*.ipynb")]
              if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))

CODE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[^\n]*$|`+[^`\n]*`+", re.S | re.M)   # fenced blocks, code spans
MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)
LINKS = (re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"),          # [text](target "title")
         re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M),                  # [ref]: target
         re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I))   # HTML


def markdown(doc: Path) -> str:
    if doc.suffix == ".ipynb":
        cells = json.loads(doc.read_text(encoding="utf-8"))["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return doc.read_text(encoding="utf-8")


def links(text: str):
    text = MATH.sub(" ", CODE.sub(" ", text))
    return [m.group(1) for pattern in LINKS for m in pattern.finditer(text)]


def broken(doc: Path, target: str):
    """Why `target`, a link in `doc`, does not work in a clone (None if it does)."""
    if re.match(r"https?://\S+$", target) or target.startswith("#"):
        return None
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("/", "\\")):
        return "neither a relative path nor an http(s) address"
    path = unquote(target.split("#")[0].split("?")[0])
    dest = (doc.parent / path).resolve()
    if not dest.is_relative_to(ROOT):
        return "leaves the repository"
    if not dest.exists():
        return "no such file or folder"
    return None


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_link_stays_in_the_repository_and_exists(doc):
    bad = [f"{t}: {why}" for t in links(markdown(doc)) if (why := broken(doc, t))]
    assert not bad, f"{doc.relative_to(ROOT)} has links that break in a clone:\n" + "\n".join(bad)


def test_the_checker_catches_bad_links(tmp_path):
    doc = ROOT / "README.md"
    text = ("[ok](toy/results/README.md) ![ok](toy/results/study2d.png) [web](https://arxiv.org/abs/2404.13903) "
            "[up](../shared/papers/x.txt) [missing](toy/nothing.md) [abs](/etc/passwd) [file](file:///tmp/x) "
            "`[code](ignored.md)` $[a](b)$\n[ref]: ../outside.md\n<img src=\"nope.png\">")
    verdicts = {t: broken(doc, t) for t in links(text)}
    assert verdicts == {"toy/results/README.md": None, "toy/results/study2d.png": None,
                        "https://arxiv.org/abs/2404.13903": None, "../shared/papers/x.txt": "leaves the repository",
                        "toy/nothing.md": "no such file or folder", "/etc/passwd": "neither a relative path nor an "
                        "http(s) address", "file:///tmp/x": "neither a relative path nor an http(s) address",
                        "../outside.md": "leaves the repository", "nope.png": "no such file or folder"}
