import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MINISPLAM_THREADS", "2")))


@pytest.fixture
def sched():
    import minisplam as ms

    return ms.sd_schedule()
