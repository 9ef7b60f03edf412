"""Shared test settings.

One intra-op thread: the test tensors are tiny, and on a 2-core machine two
threads contending with anything else turn milliseconds into seconds.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
