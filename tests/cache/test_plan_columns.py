"""``device_columns``: a step plan's per-sequence integers reach the device in one copy."""

from __future__ import annotations

import pytest
import torch

from shadowkv.cache.base import device_columns

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned, non-blocking copy needs a GPU")])]


@pytest.mark.parametrize("device", DEVICES)
def test_columns_keep_names_values_and_order(device: str) -> None:
    cols = device_columns({"rows": [3, 0, 7], "gen": [10, 2**40, 5], "primed": [True, False, True]},
                          torch.device(device))
    assert list(cols) == ["rows", "gen", "primed"]
    for name, want in (("rows", [3, 0, 7]), ("gen", [10, 2**40, 5]), ("primed", [1, 0, 1])):
        t = cols[name]
        assert t.dtype == torch.int64 and t.shape == (3,) and t.device.type == device
        assert t.tolist() == want
    one = device_columns({"a": [4]}, torch.device(device))
    assert one["a"].tolist() == [4]
