import os

import pytest
import torch

# The environment and thread settings (OMP_WAIT_POLICY, MINISPLAM_THREADS per xdist worker) and the order in which
# the workers take the files are in the root conftest.py, which every pytest run loads, notebooks-only runs included.
torch.set_num_threads(int(os.environ.get("MINISPLAM_THREADS", "2")))


@pytest.fixture
def sched():
    import minisplam as ms

    return ms.sd_schedule()


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests that draw from torch's global generator get the same numbers on every machine and in any order."""
    torch.manual_seed(0)
