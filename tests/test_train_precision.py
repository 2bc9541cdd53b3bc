"""The precision table: which dtype weights, trained parameters and compute get for each run."""

from __future__ import annotations

import pytest
import torch

from chatft.train.precision import precision_for

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(("dtype", "lora", "expected", "autocast"), [
    (F32, False, (F32, F32, F32, F32), False),
    (BF16, False, (BF16, BF16, BF16, BF16), False),  # bfloat16 has float32's range: trained directly
    (F16, False, (F32, F32, F16, F16), True),  # float32 master weights, float16 compute, written in float16
    (F32, True, (F32, F32, F32, F32), False),
    (BF16, True, (BF16, F32, BF16, F32), True),  # float32 adapters under autocast on the frozen base
    (F16, True, (F16, F32, F16, F32), True),
])
def test_precision_for_each_run(dtype, lora, expected, autocast):
    precision = precision_for(dtype, lora)
    assert (precision.weights, precision.trainable, precision.compute, precision.saved) == expected
    assert precision.autocast is autocast
    assert precision.loss_scaling is (dtype == F16)  # always with float32 trained parameters, so unscalable
    assert isinstance(precision.context(torch.device("cpu")), torch.autocast) is autocast
