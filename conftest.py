"""Settings for every pytest run in this repository, whichever paths it is given (`python -m pytest notebooks/` too):
pytest loads this root conftest.py before collecting anything. The fixtures are in tests/conftest.py."""

import os

# The suite runs on two pytest-xdist workers (pyproject.toml: -n 2), one per core, so each worker and everything it
# starts (notebook kernels, torchrun ranks, the toys' pools) computes on one thread. OpenMP threads that wait
# passively sleep instead of spinning: with two processes per core, spinning threads made one test 14x slower and a
# notebooks-only run 10x slower. Both must be set before torch loads OpenMP; subprocesses (kernels) inherit them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("MINISPLAM_THREADS", "1")

# The slowest files (pytest --durations), which the two workers take first; the rest follow in collection order, so
# that neither worker is left with a long file at the end (with --no-loadscope-reorder, which would put the files
# with the most tests first).
SLOW_FIRST = ("tests/test_sd.py", "tests/test_cli.py", "tests/test_learning.py", "tests/test_toy2d.py",
              "notebooks/04_splad_end_to_end.ipynb")


def pytest_collection_modifyitems(config, items):
    if "PYTEST_XDIST_WORKER" in os.environ:
        file_rank = {f: i for i, f in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: file_rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))   # stable
