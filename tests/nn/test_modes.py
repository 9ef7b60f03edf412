"""training_mode: switch for a block, restore every submodule's own flag, even on errors."""

import pytest
from torch import nn

from qcompiler.nn.modes import training_mode


def test_restores_each_submodule_after_an_exception():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2)).eval()
    m[1].train()
    with pytest.raises(RuntimeError), training_mode(m, True):
        assert all(x.training for x in m.modules())
        raise RuntimeError
    assert [x.training for x in m.modules()] == [False, False, True, False]
