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


@pytest.fixture(autouse=True, scope="session")
def _verify_every_pass():
    """Every compile in the tests checks the IR rules after each pass (as ``--debug`` does)."""
    import os

    previous = os.environ.get("QCOMPILER_VERIFY")
    os.environ["QCOMPILER_VERIFY"] = "1"
    yield
    if previous is None:
        os.environ.pop("QCOMPILER_VERIFY", None)
    else:
        os.environ["QCOMPILER_VERIFY"] = previous
