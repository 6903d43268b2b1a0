"""Every figure stored in a notebook can be read: at least 800 px wide (the notebooks draw at dpi 100)."""

import base64
import json
import struct
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def stored_pngs(nb: Path):
    for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
        for out in cell.get("outputs", []):
            if "image/png" in out.get("data", {}):
                yield i, base64.b64decode(out["data"]["image/png"])


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_every_stored_figure_is_at_least_800_px_wide(nb):
    pngs = list(stored_pngs(nb))
    assert pngs, f"{nb.name} stores no figure: run it (CI=true) before committing"
    for i, png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])                  # the IHDR chunk
        assert width >= 800, f"{nb.name}, cell {i}: a figure {width} px wide (at least 800)"
