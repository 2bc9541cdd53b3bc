"""QLoRA: LoRA on a 4-bit base (bitsandbytes NF4/FP4) through the real CLI on a tiny model: training, the manifest's
record, the adapter loading with plain PEFT on a 4-bit and on a full-precision base, merge, eval, the refusals,
AutoModel's `quantization` block and the memory estimate's 4-bit arithmetic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from clirun import assert_error_block, run_chatft

from chatft import artifacts, quantization
from chatft.config.compile import compile_config
from chatft.errors import ChatftError
from chatft.steps.registry import resolve_step
from chatft.train import memory

pytest.importorskip("bitsandbytes", reason="QLoRA needs the chatft[qlora] extra (part of the test extras)")


def write_rows(path: Path, n: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i % 7} plus {i % 5}?"},
                          {"role": "assistant", "content": f"{i % 7} plus {i % 5} is {i % 7 + i % 5}."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qlora_args(model_dir: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model_dir}",
            f"dataset.path_or_dataset_id={data}", f"checkpoint.checkpoint_dir={run_dir}", "model.quantization=nf4",
            "step_scheduler.global_batch_size=4", "step_scheduler.max_steps=6", "step_scheduler.ckpt_every_steps=3",
            "step_scheduler.val_every_steps=null", "lr_scheduler.lr_warmup_steps=0",
            "lr_scheduler.lr_decay_style=constant", "optimizer.lr=1e-2", *extra]


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """`chatft run peft/automodel ... model.quantization=nf4`, once for the module."""
    work = tmp_path_factory.mktemp("qlora")
    data = write_rows(work / "train.jsonl", 24)
    result = run_chatft(*qlora_args(tiny_model_dir, data, work / "run"), cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LoRA on a 4-bit NF4 base" in result.stdout  # the estimate line names the base it counts
    return work / "run"


def test_qlora_trains_and_records_the_quantization(qlora_run, tiny_model_dir):
    losses = [json.loads(line)["loss"] for line in (qlora_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    manifest = artifacts.read_manifest(qlora_run / "final")
    bnb_version = __import__("importlib.metadata").metadata.version("bitsandbytes")
    assert manifest["quantization"] == {"type": "nf4", "double_quantization": True, "compute_dtype": "float32",
                                        "bits": 4, "method": "bitsandbytes", "bitsandbytes": bnb_version}
    # the base is named by its unquantized weight files, as for any adapter
    assert manifest["base_model"]["fingerprint"] == artifacts.weights_fingerprint(tiny_model_dir)
    assert (qlora_run / "final" / "adapter_model.safetensors").is_file()
    peak, estimate = manifest["metrics"]["peak_mem_mb"], manifest["metrics"]["memory_estimate_mb"]
    # Within 20% either way (measured: 420 MB against 439 MB; SmolLM2-135M, 3 steps by hand: 1,912 against 2,034).
    # The peak is the run's own (`memory.peak_rss`), not that of the pytest process that started it.
    assert abs(estimate - peak) < 0.2 * peak, (estimate, peak)


def test_a_resumed_qlora_run_equals_the_uninterrupted_one(qlora_run, tiny_model_dir, tmp_path):
    """Forked from the step-3 checkpoint of the module's run (same settings, constant learning rate), steps 4-6
    and the adapter come out the same."""
    from safetensors.torch import load_file

    data = write_rows(tmp_path / "train.jsonl", 24)  # the same rows as the module's run
    result = run_chatft(*qlora_args(tiny_model_dir, data, tmp_path / "fork",
                                    f"checkpoint.resume={qlora_run / 'checkpoints' / 'step_3'}"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "fork") == losses(qlora_run)[3:]
    whole = load_file(str(qlora_run / "final" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "fork" / "final" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_activation_checkpointing_over_a_4bit_base_trains_the_same_adapter(qlora_run, tiny_model_dir, tmp_path):
    """Each decoder layer recomputed in the backward, its 4-bit weights dequantized again: the same losses and adapter
    as the module's run, which keeps the activations."""
    from safetensors.torch import load_file

    data = write_rows(tmp_path / "train.jsonl", 24)
    result = run_chatft(*qlora_args(tiny_model_dir, data, tmp_path / "recomputed",
                                    "distributed.activation_checkpointing=true"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "activation checkpointing: full" in result.stdout
    assert artifacts.read_manifest(tmp_path / "recomputed" / "final")["metrics"]["activation_checkpointing"] == "full"

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "recomputed") == pytest.approx(losses(qlora_run), abs=1e-6)
    kept = load_file(str(qlora_run / "final" / "adapter_model.safetensors"))
    recomputed = load_file(str(tmp_path / "recomputed" / "final" / "adapter_model.safetensors"))
    assert kept.keys() == recomputed.keys()
    assert all(torch.allclose(kept[k], recomputed[k], atol=1e-6) for k in kept)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_adapter_loads_with_plain_peft_on_a_4bit_and_a_full_precision_base(qlora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 21]])
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = _logits(full, ids)
    on_full = PeftModel.from_pretrained(full, qlora_run / "final").eval()
    four_bit = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    quant_base_logits = _logits(four_bit, ids)
    on_4bit = PeftModel.from_pretrained(four_bit, qlora_run / "final").eval()
    trained_full, trained_4bit = _logits(on_full, ids), _logits(on_4bit, ids)
    change_4bit, change_full = trained_4bit - quant_base_logits, trained_full - base_logits
    assert float(change_4bit.abs().max()) > 0.05  # the adapter moves the 4-bit base's logits
    # and moves the full-precision base's the same way (as far as the two bases differ)
    assert torch.nn.functional.cosine_similarity(change_4bit.flatten(), change_full.flatten(), dim=0) > 0.8


def test_refusals_come_before_anything_loads(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", 4)
    full_sft = run_chatft("run", "sft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                          f"dataset.path_or_dataset_id={data}", f"checkpoint.checkpoint_dir={tmp_path / 'sft'}",
                          "model.quantization=fp4", cwd=tmp_path)
    assert "peft=lora" in assert_error_block(full_sft, "config_invalid")
    # bitsandbytes that cannot be imported (a stand-in package first on the path): the install command
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named bitsandbytes')\n")
    missing = run_chatft(*qlora_args(tiny_model_dir, data, tmp_path / "run"), cwd=tmp_path,
                         env={"PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])})
    assert "pip install 'chatft[qlora]'" in assert_error_block(missing, "config_invalid")
    # the keys that tune a quantization, set without one, would do nothing: refused (checked in-process)
    stray = compile_config(resolve_step("peft/automodel"), "tiny", [
        f"model.pretrained_model_name_or_path={tiny_model_dir}", "model.double_quantization=false"]).validated
    with pytest.raises(ChatftError) as err:
        quantization.check_training(stray)
    assert err.value.id == "config_invalid" and "without model.quantization" in err.value.message
    sharded = compile_config(resolve_step("peft/automodel"), "tiny", [
        f"model.pretrained_model_name_or_path={tiny_model_dir}", "model.quantization=nf4",
        "distributed.strategy=fsdp2"]).validated
    with pytest.raises(ChatftError) as err:
        quantization.check_training(sharded)
    assert err.value.id == "not_available_yet" and "fsdp2" in err.value.message


def test_automodel_quantization_block_is_read_as_it_is(tmp_path):
    tiny = Path(__file__).resolve().parent.parent / "src/chatft/steps/peft/automodel/config/tiny.yaml"
    config = tmp_path / "qlora.yaml"
    config.write_text(
        f"defaults: {tiny}\n"
        "quantization:\n  load_in_4bit: true\n  load_in_8bit: false\n  bnb_4bit_compute_dtype: bfloat16\n"
        "  bnb_4bit_use_double_quant: false\n  bnb_4bit_quant_type: fp4\n  bnb_4bit_quant_storage: bfloat16\n")
    step = resolve_step("peft/automodel")
    compiled = compile_config(step, str(config), [])
    model = compiled.validated.model
    assert (model.quantization, model.double_quantization, model.quantization_compute_dtype) == \
        ("fp4", False, "bfloat16")
    assert any("bnb_4bit_quant_storage" in line for line in compiled.warnings)
    config.write_text(f"defaults: {tiny}\nquantization:\n  load_in_8bit: true\n")
    with pytest.raises(ChatftError) as err:
        compile_config(step, str(config), [])
    assert err.value.id == "not_available_yet"


def test_the_estimate_counts_4bit_weights_and_the_ladder_offers_them(tiny_model_dir, tmp_path):
    from chatft.config.schema import TrainingConfig

    def cfg(**model):
        return TrainingConfig.model_validate({
            "model": {"pretrained_model_name_or_path": str(tiny_model_dir), "torch_dtype": "float32", **model},
            "dataset": {"path_or_dataset_id": "unused.jsonl"}, "peft": "lora"})

    gpu = torch.device("cuda")  # only the arithmetic: nothing touches CUDA
    lora = memory.estimate_memory(cfg(), device=gpu)
    nf4 = memory.estimate_memory(cfg(quantization="nf4"), device=gpu)
    single = memory.estimate_memory(cfg(quantization="nf4", double_quantization=False), device=gpu)
    base = memory.meta_model(cfg())
    # on CPU the checkpoint's pages read while quantizing stay resident: the unquantized weights count too
    on_cpu = memory.estimate_memory(cfg(quantization="nf4"), device=torch.device("cpu"))
    assert on_cpu.weights - nf4.weights == sum(p.numel() for p in base.parameters()) * 4
    linear = sum(m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # a 4-bit layer: half a byte a weight plus its block scales instead of 4 bytes
    assert lora.weights - nf4.weights == pytest.approx(linear * (4 - 0.5 - 1 / 64), rel=1e-3)
    assert single.weights - nf4.weights == pytest.approx(linear * (4 / 64 - 1 / 64), rel=1e-2)
    assert nf4.compute_copies == max(m.weight.numel() for n, m in base.named_modules()
                                     if isinstance(m, torch.nn.Linear) and n != "lm_head") * 4
    full_hint, lora_hint = memory.advice_ladder(False), memory.advice_ladder(True)
    assert full_hint.index("peft=lora") < full_hint.index("model.quantization=nf4") < full_hint.index("seq_length")
    assert lora_hint.index("peft.dim") < lora_hint.index("model.quantization=nf4") < lora_hint.index("seq_length")
    assert "model.quantization" not in memory.advice_ladder(True, offer_qlora=False)


def test_merge_goes_into_the_full_precision_base_and_eval_scores_the_4bit_one(qlora_run, tiny_model_dir, tmp_path):
    merged = tmp_path / "merged"
    result = run_chatft("run", "convert/merge_lora", f"lora_checkpoint={qlora_run}", f"output_hf_path={merged}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    check = artifacts.read_manifest(merged)["metrics"]["merge_check"]
    assert check["dtype"] == "float32" and check["max_abs_logit_diff"] <= check["tolerance"]  # vs the float32 base
    as_trained = check["against_4bit_base"]  # vs the 4-bit base + adapter: reported, within 3x quantization's own
    assert 0 < as_trained["max_abs_logit_diff"] <= as_trained["tolerance"] and as_trained["within_tolerance"]
    from safetensors.torch import load_file
    weights = load_file(str(merged / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # plain weights, nothing 4-bit
    assert not (merged / "config.json").read_text().count("quantization_config")

    data = write_rows(tmp_path / "eval.jsonl", 8)
    evaluated = run_chatft("run", "eval/model_eval", "-c", "tiny", f"base={tiny_model_dir}", f"adapter={qlora_run}",
                           f"merged={merged}", "targets=[base,adapter,merged]", f"dataset.path_or_dataset_id={data}",
                           f"output_dir={tmp_path / 'eval'}", "generation.num_prompts=1",
                           "generation.max_new_tokens=4", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert any("4-bit NF4" in note for note in results["targets"]["adapter"]["notes"])
    assert not results["targets"]["base"]["notes"]
    assert results["adapter_vs_merged"]["adapter_on_4bit_base"] and results["adapter_vs_merged"]["passed"]
    losses = {name: results["targets"][name]["metrics"]["loss"] for name in ("base", "adapter", "merged")}
    assert losses["adapter"] < losses["base"] and losses["merged"] < losses["base"]


def test_plan_picks_qlora_when_lora_fits_nowhere_and_writes_its_config(tmp_path):
    import yaml

    result = run_chatft("plan", "--gpus", "2", "--gpu-memory-gb", "80", "--model", "meta-llama/Llama-3.1-70B-Instruct",
                        "--want", "adapter", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on the base loaded in 4-bit NF4 (QLoRA, `model.quantization=nf4`)" in result.stdout
    assert "LoRA (DDP, replicated" in result.stdout and "does NOT fit" in result.stdout
    assert "LoRA on a 4-bit NF4 base (DDP, replicated" in result.stdout
    written = tmp_path / "out" / "2-peft.yaml"
    assert yaml.safe_load(written.read_text())["model"]["quantization"] == "nf4"
    compiled = compile_config(resolve_step("peft/automodel"), str(written), [])
    assert compiled.validated.model.quantization == "nf4" and compiled.validated.peft is not None
    # where plain LoRA fits, the plan keeps the full-precision base
    small = run_chatft("plan", "--gpus", "1", "--gpu-memory-gb", "80", "--model", "meta-llama/Llama-3.1-8B-Instruct",
                       "--want", "adapter", "--out", "small", cwd=tmp_path)
    assert small.returncode == 0 and "4-bit" not in small.stdout
    assert "quantization" not in (tmp_path / "small" / "2-peft.yaml").read_text()


def test_an_eval_pass_keeps_the_4bit_layers_trainable_and_in_their_compute_dtype(tiny_model_dir):
    """bitsandbytes would repack a 4-bit weight on its first no-grad eval-mode call on an AVX512-BF16 CPU (this
    test's machines) into a bfloat16-only layout without a backward: the input's gradient then comes back None."""
    from chatft.config.schema import ModelSection
    from chatft.train.model import load_model

    section = ModelSection(pretrained_model_name_or_path=str(tiny_model_dir), torch_dtype="float32",
                           quantization="nf4")
    layer = quantization.linear4bit_modules(load_model(section, torch.device("cpu"), torch.float32))[0]
    inputs = torch.randn(3, layer.in_features)
    layer.eval()
    with torch.no_grad():
        before = layer(inputs)
        again = layer(inputs)
    assert torch.equal(before, again) and again.dtype == torch.float32
    layer.train()
    x = inputs.clone().requires_grad_(True)
    layer(x).square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_eval_scores_a_qlora_adapter_on_its_4bit_and_its_full_precision_base(qlora_run, tiny_model_dir, tmp_path):
    """`qlora_base=both`: the adapter as trained (4-bit base) and on the unquantized base are two points, each
    naming its base; the full-precision one is plain PEFT on the float32 base, and the merged model is checked
    against it with float32's tolerance."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatft.config.schema import ModelSection
    from chatft.data.pipeline import prepare_training_data
    from chatft.train import batching, losses
    from chatft.train.model import load_tokenizer

    merged = tmp_path / "merged"  # plain PEFT's merge into the float32 base: no chatft manifest
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    on_full = PeftModel.from_pretrained(full, qlora_run / "final").eval()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                              qlora_run / "final").merge_and_unload().save_pretrained(merged)
    load_tokenizer(ModelSection(pretrained_model_name_or_path=str(qlora_run / "final"))).save_pretrained(merged)
    data = write_rows(tmp_path / "eval.jsonl", 6)
    args = [f"base={tiny_model_dir}", f"adapter={qlora_run}", f"merged={merged}", "targets=[adapter,merged]",
            "qlora_base=both", f"dataset.path_or_dataset_id={data}", f"output_dir={tmp_path / 'eval'}",
            "generation.num_prompts=0"]
    result = run_chatft("run", "eval/model_eval", "-c", "tiny", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    targets = results["targets"]
    assert list(targets) == ["adapter", "adapter_on_full_precision", "merged"]
    as_trained, unquantized = targets["adapter"], targets["adapter_on_full_precision"]
    recorded = artifacts.read_manifest(qlora_run / "final")["quantization"]
    assert (as_trained["base_precision"], as_trained["base_quantization"]) == ("4-bit nf4", recorded)
    assert (unquantized["base_precision"], unquantized["base_quantization"]) == ("float32", None)
    assert "merged" in targets and "base_precision" not in targets["merged"]
    assert any("not on the 4-bit NF4" in note for note in unquantized["notes"])

    compiled = compile_config(resolve_step("eval/model_eval"), "tiny", args)
    tokenizer = load_tokenizer(ModelSection(pretrained_model_name_or_path=str(qlora_run / "final")))
    rows = prepare_training_data(compiled.validated.dataset, tokenizer).rows
    expected = losses.score_batches(on_full, batching.micro_batches(rows, 2, 0), torch.device("cpu")).loss
    assert unquantized["metrics"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(as_trained["metrics"]["loss"] - expected) > 1e-3  # quantizing the base changes what it scores

    check = results["adapter_vs_merged"]  # the merged model holds the full-precision base: compared with that point
    assert check["adapter_target"] == "adapter_on_full_precision" and not check["adapter_on_4bit_base"]
    assert check["tolerance"] == 1e-4 and check["relative_difference"] < 1e-5 and check["passed"]
    assert "| adapter's base | 4-bit nf4 | float32 | - |" in result.stdout
    assert "adapter_on_full_precision vs merged: loss" in result.stdout
    validations = artifacts.read_manifest(qlora_run / "final")["validations"]
    mine = [v for v in validations if v["eval_results"] == str((tmp_path / "eval" / "eval_results.json").resolve())]
    assert [(v["target"], v["base_precision"]) for v in mine] == [("adapter", "4-bit nf4"),
                                                                 ("adapter_on_full_precision", "float32")]
    assert [v.get("adapter_merged_agreement") for v in mine] == [None, True]
