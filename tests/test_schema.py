"""The typed schema: shorthands, cross-key checks, and every problem reported at once."""

from __future__ import annotations

import pytest

from chatft.config.schema import TrainingConfig, known_paths, validate_config
from chatft.errors import ChatftError

MINIMAL = {"model": {"pretrained_model_name_or_path": "m"}, "dataset": {"path_or_dataset_id": "d.jsonl"}}


def training(**sections) -> TrainingConfig:
    return validate_config("training", {**MINIMAL, **sections}, "test.yaml")


def test_peft_lora_expands_to_the_default_block():
    peft = training(peft="lora").peft
    assert (peft.dim, peft.alpha, peft.dropout) == (16, 32, 0.05)
    assert peft.match_all_linear is True
    assert peft.target_modules is None


@pytest.mark.parametrize("value", [None, "null", "none"])
def test_peft_null_is_full_sft(value):
    assert training(peft=value).peft is None


def test_absent_peft_is_full_sft():
    assert training().peft is None


def test_target_modules_turn_off_match_all_linear_unless_both_are_set():
    assert training(peft={"target_modules": ["q_proj"]}).peft.match_all_linear is False
    with pytest.raises(ChatftError, match="exclusive"):
        training(peft={"target_modules": ["q_proj"], "match_all_linear": True})


@pytest.mark.parametrize(("alias", "dtype"), [("bf16", "bfloat16"), ("torch.float16", "float16"), ("fp32", "float32")])
def test_dtype_aliases(alias, dtype):
    assert training(model={"pretrained_model_name_or_path": "m", "torch_dtype": alias}).model.torch_dtype == dtype


def test_dp_size_none_string_and_grad_accumulation():
    cfg = training(distributed={"dp_size": "none"}, step_scheduler={"global_batch_size": 32, "local_batch_size": 4})
    assert cfg.distributed.dp_size is None
    assert cfg.grad_accumulation_steps() == 8


def test_global_batch_must_divide_by_local_times_data_parallel():
    with pytest.raises(ChatftError) as err:
        training(step_scheduler={"global_batch_size": 32, "local_batch_size": 4}, distributed={"dp_size": 3})
    assert "global_batch_size (32)" in err.value.message and "data-parallel size (3)" in err.value.message


def test_data_parallel_size_follows_the_launcher_layout():
    cfg = training(run={"env": {"nodes": 2, "nprocs_per_node": 4}},
                   step_scheduler={"global_batch_size": 64, "local_batch_size": 2})
    assert cfg.data_parallel_size() == 8
    assert cfg.grad_accumulation_steps() == 4


def test_every_problem_is_reported_at_once_with_did_you_mean():
    with pytest.raises(ChatftError) as err:
        validate_config(
            "training",
            {
                "model": {"pretrained_model_name_or_path": "m", "torch_dtyp": "bf16"},
                "dataset": {"path_or_dataset_id": "d", "seq_length": "long"},
                "step_scheduler": {"lr": 1e-4},
                "optimiser": {},
            },
            "cfg.yaml",
        )
    message = err.value.message
    assert err.value.id == "config_invalid"
    assert "4 problem(s)" in message
    assert "unknown key `model.torch_dtyp` (did you mean model.torch_dtype?)" in message
    assert "`dataset.seq_length`" in message and "'long'" in message
    assert "unknown key `step_scheduler.lr` (did you mean optimizer.lr?)" in message
    assert "unknown key `optimiser` (did you mean optimizer?)" in message


def test_missing_required_keys_are_named():
    with pytest.raises(ChatftError) as err:
        validate_config("training", {"dataset": {"path_or_dataset_id": "d"}}, "cfg.yaml")
    assert "`model` is required" in err.value.message


def test_choices_are_enforced():
    with pytest.raises(ChatftError, match="truncation"):
        training(dataset={"path_or_dataset_id": "d", "truncation": "sometimes"})


def test_resume_false_is_kept_as_the_string_false():
    assert training(checkpoint={"resume": False}).checkpoint.resume == "false"


def test_eval_targets_need_their_paths():
    with pytest.raises(ChatftError, match="adapter"):
        validate_config("eval", {"targets": ["base", "adapter"], "base": "b", "dataset": {"path_or_dataset_id": "d"}}, "e")
    ok = validate_config("eval", {"targets": ["merged"], "merged": "m", "dataset": {"path_or_dataset_id": "d"}}, "e")
    assert ok.targets == ["merged"]


def test_known_paths_cover_nested_sections():
    paths = known_paths(TrainingConfig)
    for path in ("step_scheduler.global_batch_size", "peft.dim", "validation_dataset.seq_length", "run.env.nodes"):
        assert path in paths


def test_validation_rows_follow_the_training_settings_unless_given():
    """A 512-token training config validates on 512-token rows rendered the same way, not on the 2048 default."""
    cfg = TrainingConfig.model_validate({**MINIMAL, "dataset": {"path_or_dataset_id": "t.jsonl", "seq_length": 512,
                                                             "train_on": "last_assistant", "truncation": "truncate"},
                                         "validation_dataset": {"path_or_dataset_id": "v.jsonl"}})
    validation = cfg.validation_dataset
    assert (validation.seq_length, validation.train_on, validation.truncation) == (512, "last_assistant", "truncate")
    assert validation.path_or_dataset_id == "v.jsonl" and validation.num_samples_limit is None
    given = TrainingConfig.model_validate({**MINIMAL, "dataset": {"path_or_dataset_id": "t.jsonl", "seq_length": 512},
                                           "validation_dataset": {"path_or_dataset_id": "v.jsonl", "seq_length": 1024}})
    assert given.validation_dataset.seq_length == 1024
    assert TrainingConfig.model_validate(cfg.model_dump()).validation_dataset == validation  # stable when re-read


def test_unknown_keys_in_speed_only_sections_warn_and_elsewhere_stay_errors(tmp_path):
    """A config newer than chatft still runs: an unknown key where only speed or memory layout is tuned is one
    warning naming it; a typo anywhere else is still refused (through the real CLI, `--dry-run`)."""
    from clirun import assert_error_block, run_chatft

    lenient = ("distributed.new_knob=3", "model.backend.fancy_kernel=true", "dist_env.foo=1", "compile.bar=2")
    result = run_chatft("run", "sft/automodel", "-c", "tiny", *lenient, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for key in ("distributed.new_knob: 3", "model.backend.fancy_kernel: true", "dist_env.foo: 1", "compile.bar: 2"):
        assert (result.stdout + result.stderr).count(f"`{key}` does not apply: a key this chatft does not know") == 1
    refused = run_chatft("run", "sft/automodel", "-c", "tiny", "optimizer.lrr=1", "distributed.new_knob=3",
                         "--dry-run", cwd=tmp_path)
    assert_error_block(refused, "config_invalid")
    assert "unknown key `optimizer.lrr`" in refused.stderr and "new_knob" not in refused.stderr
