"""The precision table: which dtype weights, trained parameters, AdamW moments and compute get for each run, and
bfloat16 full SFT that learns like float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_module_from_path
from safetensors.torch import load_file

from chatft.train.step import train
from chatft.train.precision import precision_for
from chatft.train.stochastic_rounding import StochasticRoundingAdamW, random_low_bits, round_stochastically, \
    rounding_key

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")


@pytest.mark.parametrize(("dtype", "lora", "master", "expected", "autocast"), [
    (F32, False, "auto", (F32, F32, F32, F32, F32), False),
    (BF16, False, "auto", (F32, F32, BF16, BF16, F32), True),  # float32 master weights, bfloat16 compute
    (BF16, False, "float32", (F32, F32, BF16, BF16, F32), True),
    (BF16, False, "stochastic_rounding", (BF16, BF16, BF16, BF16, F32), False),
    (BF16, False, "none", (BF16, BF16, BF16, BF16, BF16), False),  # pure bfloat16: loses small updates
    (F16, False, "auto", (F32, F32, F16, F16, F32), True),  # float32 master weights, written in float16
    (F32, True, "auto", (F32, F32, F32, F32, F32), False),
    (BF16, True, "none", (BF16, F32, BF16, F32, F32), True),  # float32 adapters whatever master_weights says
    (F16, True, "auto", (F16, F32, F16, F32, F32), True),
])
def test_precision_for_each_run(dtype, lora, master, expected, autocast):
    precision = precision_for(dtype, lora, master)
    got = (precision.weights, precision.trainable, precision.compute, precision.saved, precision.moments)
    assert got == expected
    assert precision.autocast is autocast
    assert precision.loss_scaling is (dtype == F16)  # always with float32 trained parameters, so unscalable
    assert precision.stochastic_rounding is (master == "stochastic_rounding" and not lora)
    assert precision.loses_small_updates is (master == "none" and not lora and dtype == BF16)
    assert isinstance(precision.context(torch.device("cpu")), torch.autocast) is autocast


def test_float16_full_sft_refuses_to_drop_its_master_weights(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="float16 full SFT needs float32 master weights"):
        helpers.training_config(tiny_model_dir, tmp_path, model__torch_dtype="float16",
                                optimizer__master_weights="none")
    helpers.training_config(tiny_model_dir, tmp_path, lora=True, model__torch_dtype="float16",
                            optimizer__master_weights="none")  # LoRA: no effect, not an error


def _noise(count: int, key: int = 7) -> torch.Tensor:
    return random_low_bits(key, 0, count, torch.device("cpu"))


def test_stochastic_rounding_is_unbiased_and_exact_on_bfloat16_values():
    exact = torch.randn(1000).to(BF16)
    out = torch.empty_like(exact)
    round_stochastically(exact.float(), out, _noise(1000))
    assert torch.equal(out, exact)  # a bfloat16 value is never moved
    # 1.0 + a quarter of bfloat16's step at 1.0 (2**-7): rounds up a quarter of the time, so the mean is kept
    values = torch.full((200_000,), 1.0 + 2.0**-9)
    round_stochastically(values.clone(), out := torch.empty(200_000, dtype=BF16), _noise(200_000))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2.0**-9, abs=2e-5)
    negative = torch.full((200_000,), -(1.0 + 2.0**-9))
    round_stochastically(negative, out, _noise(200_000, key=8))
    assert out.float().mean().item() == pytest.approx(-(1.0 + 2.0**-9), abs=2e-5)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    round_stochastically(special.clone(), out := torch.empty(4, dtype=BF16), _noise(4))
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 0


def test_the_random_bits_are_uniform_and_depend_only_on_the_key_and_the_element():
    bits = _noise(1 << 20)
    assert bits.dtype == torch.int32 and bits.min() >= 0 and bits.max() < 1 << 16
    # every one of the 16 bits is set half the time, and neighbouring elements do not follow each other
    for bit in range(16):
        assert ((bits >> bit) & 1).float().mean().item() == pytest.approx(0.5, abs=3e-3), bit
    centred = bits.double() - bits.double().mean()
    assert (centred[1:] * centred[:-1]).mean().item() / centred.var().item() == pytest.approx(0.0, abs=5e-3)
    # the bits of elements 1000.. are the same whether asked for alone (a process holding rows from there) or
    # within the whole tensor: what makes a sharded update round as one process's does
    assert torch.equal(random_low_bits(7, 1000, 500, torch.device("cpu")), bits[1000:1500])
    # and differ with the step, the parameter and the seed
    keys = {rounding_key(0, 1, 0), rounding_key(0, 2, 0), rounding_key(0, 1, 1), rounding_key(1, 1, 0)}
    assert len(keys) == 4
    assert not torch.equal(random_low_bits(rounding_key(0, 1, 0), 0, 64, torch.device("cpu")),
                           random_low_bits(rounding_key(0, 2, 0), 0, 64, torch.device("cpu")))


def test_stochastic_rounding_adamw_follows_float32_adamw():
    """Many tiny updates, each far below bfloat16's step: AdamW in float32 moves the weights; the stochastic
    rounding one moves their bfloat16 copies the same way on average; round-to-nearest leaves them where they were."""
    torch.manual_seed(0)
    start = torch.randn(4096)
    gradient = torch.randn(4096)
    runs = {}
    for name in ("float32", "stochastic", "nearest"):
        dtype = F32 if name == "float32" else BF16
        param = torch.nn.Parameter(start.to(dtype).clone())
        optimizer = (StochasticRoundingAdamW([param], lr=1e-4, seed=3) if name == "stochastic" else
                     torch.optim.AdamW([param], lr=1e-4, weight_decay=0.0))
        for _ in range(50):
            param.grad = gradient.to(dtype)
            optimizer.step()
        runs[name] = (param.detach().float() - start.to(dtype).float())
    expected = runs["float32"]  # about 50 x 1e-4 against the gradient's sign
    assert (runs["stochastic"] - expected).mean().abs().item() < 2e-4
    assert runs["stochastic"].abs().mean().item() == pytest.approx(expected.abs().mean().item(), rel=0.1)
    assert runs["nearest"].abs().mean().item() < 0.2 * expected.abs().mean().item()


def test_stochastic_rounding_adamw_resumes_exactly():
    torch.manual_seed(0)
    start, grads = torch.randn(64).to(BF16), [torch.randn(64).to(BF16) for _ in range(4)]

    def run(steps, state=None, weights=None):
        param = torch.nn.Parameter((weights if weights is not None else start).clone())
        optimizer = StochasticRoundingAdamW([param], lr=1e-3, seed=5)
        if state is not None:
            optimizer.load_state_dict(state)
        for grad in steps:
            param.grad = grad
            optimizer.step()
        return param.detach(), optimizer.state_dict()

    straight, _ = run(grads)
    half, state = run(grads[:2])
    resumed, _ = run(grads[2:], state, half)
    assert torch.equal(straight, resumed)


# --------------------------------------------------------------------------- bfloat16 full SFT learns


@pytest.fixture(scope="module")
def twenty_steps(tiny_model_dir, tokenizer, tmp_path_factory):
    """20 steps of full SFT at lr 1e-5 (constant), in float32 and in bfloat16 with each master_weights setting.
    Returns per setting: the losses, the share of weights that moved (in the trained dtype), the manifest."""
    data = helpers.prepared(helpers.chat_rows(tokenizer, 16))
    initial = load_file(str(next(Path(tiny_model_dir).glob("*.safetensors"))))
    runs = {}
    for name, overrides in [("float32", {}), ("auto", {"model__torch_dtype": "bfloat16"}),
                            ("stochastic_rounding", {"model__torch_dtype": "bfloat16",
                                                     "optimizer__master_weights": "stochastic_rounding"}),
                            ("none", {"model__torch_dtype": "bfloat16", "optimizer__master_weights": "none"})]:
        run_dir = tmp_path_factory.mktemp(f"bf16-{name}")
        cfg = helpers.training_config(tiny_model_dir, run_dir, step_scheduler__max_steps=20, optimizer__lr=1e-5,
                                      optimizer__weight_decay=0.0, lr_scheduler__lr_warmup_steps=0,
                                      lr_scheduler__lr_decay_style="constant", **overrides)
        result = train(cfg, run_dir, data, tokenizer=tokenizer)
        trainer = result.trainer
        moved = total = 0
        for param_name, param in trainer.model.named_parameters():
            if param_name in initial:
                moved += int((param.detach() != initial[param_name].to(param.dtype)).sum())
                total += param.numel()
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        manifest = json.loads((result.final_dir / "chatft_manifest.json").read_text())
        runs[name] = {"losses": losses, "moved": moved / total, "manifest": manifest, "final": result.final_dir}
    return runs


# Over these 20 steps float32's loss falls by about 0.037; bfloat16 weights updated in place (`none`) lag it by
# about as much. Every step of a setting that keeps the updates stays within 0.005 of float32's loss (observed:
# 0.0002-0.0003, the noise of bfloat16 compute).
LOSS_TOLERANCE = 0.005


@pytest.mark.parametrize("setting", ["auto", "stochastic_rounding"])
def test_bfloat16_full_sft_tracks_float32(twenty_steps, setting):
    reference, run = twenty_steps["float32"], twenty_steps[setting]
    distance = max(abs(a - b) for a, b in zip(run["losses"], reference["losses"]))
    assert distance < LOSS_TOLERANCE, (
        f"bfloat16 ({setting}) strays {distance:.4f} from float32's loss; weights moved: {run['moved']:.1%} "
        f"(float32: {reference['moved']:.1%}); losses {run['losses']} vs {reference['losses']}")
    assert reference["losses"][0] - reference["losses"][-1] > 4 * LOSS_TOLERANCE  # the run really learns
    assert run["moved"] > 0.5 * reference["moved"], f"weights moved: {run['moved']:.1%} vs {reference['moved']:.1%}"


def test_pure_bfloat16_loses_the_updates_it_is_warned_about(twenty_steps):
    """What `optimizer.master_weights=none` does, and why it is not the default: this test fails the day it
    learns like float32, and the default should then be looked at again."""
    reference, run = twenty_steps["float32"], twenty_steps["none"]
    lag = run["losses"][-1] - reference["losses"][-1]
    assert lag > LOSS_TOLERANCE and run["moved"] < 0.3 * reference["moved"], (lag, run["moved"], reference["moved"])


def test_bfloat16_full_sft_records_its_precision_and_saves_bfloat16(twenty_steps):
    assert twenty_steps["auto"]["manifest"]["metrics"]["precision"] == {
        "weights": "float32", "trainable": "float32", "compute": "bfloat16", "saved": "bfloat16",
        "optimizer_moments": "float32", "weight_update": "round to nearest"}
    assert twenty_steps["stochastic_rounding"]["manifest"]["metrics"]["precision"]["weight_update"] == \
        "stochastic rounding"
    for name in ("auto", "stochastic_rounding", "none"):
        weights = load_file(str(twenty_steps[name]["final"] / "model.safetensors"))
        assert {t.dtype for t in weights.values()} == {BF16}, name
