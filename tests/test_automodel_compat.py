"""Configs written for NeMo AutoModel compile unchanged (apart from paths), with one warning per
setting that does not apply; `_target_`s are mapped, never imported, and unknown ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatft.config.automodel import translate
from chatft.config.compile import compile_config
from chatft.config.schema import DistributedSection
from chatft.errors import ChatftError
from chatft.steps.registry import resolve_step

FIXTURES = Path(__file__).parent / "fixtures" / "automodel"


def compile_fixture(name: str, step: str = "sft/automodel", overrides=None):
    return compile_config(resolve_step(step), str(FIXTURES / name), overrides)


def test_chat_peft_config_maps_onto_chatft(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("RUN_ROOT", "/scratch/runs")
    compiled = compile_fixture("llm_chat_peft.yaml")
    cfg = compiled.validated
    assert cfg.seed == 1111  # rng.seed becomes the seed
    assert cfg.model.pretrained_model_name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    assert cfg.model.torch_dtype == "bfloat16"
    assert cfg.checkpoint.checkpoint_dir == "/scratch/runs/llama-peft"
    assert cfg.dataset.split == "train_sft[:64]"
    assert cfg.dataset.truncation == "truncate"  # longest_first
    assert cfg.validation_dataset.seq_length == 2048  # ${oc.select:dataset.seq_length,1024}
    assert (cfg.peft.dim, cfg.peft.alpha, cfg.peft.match_all_linear) == (8, 32, True)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.eps == 1e-8
    assert cfg.step_scheduler.max_steps == 400
    assert cfg.wandb.project is None and cfg.wandb.name == "llama-peft"
    assert compiled.warnings == [
        "`dataset.start_of_turn_token: <|start_header_id|>assistant` does not apply: "
        "chatft finds assistant turns from the chat template itself",
        "`peft.use_triton: true` does not apply: chatft uses peft's LoRA layers",
        "`dist_env.backend: nccl` does not apply: the run has one process",
        # FSDP2Manager names the strategy, which one process has no use for
        "`distributed.strategy: fsdp2` does not apply: the run has one process: nothing is sharded or replicated",
    ]


def test_step_catalog_config_uses_the_launcher_layout_and_warns_per_setting():
    compiled = compile_fixture("step_catalog_sft.yaml")
    cfg = compiled.validated
    assert cfg.data_parallel_size() == 16  # run.env: 2 nodes x 8 processes
    assert cfg.grad_accumulation_steps() == 1
    assert cfg.peft is None
    assert cfg.distributed.activation_checkpointing is True
    assert cfg.optimizer.betas == (0.9, 0.95)
    warned = {line.split("`")[1] for line in compiled.warnings}
    assert warned == {
        "model.backend.attn: te",
        "model.backend.linear: te",
        "distributed.ep_size: 8",
        "run.env.container_image: nvcr.io/nvidia/nemo-automodel:26.04",
    }  # FSDP2Config on 16 processes: sharded as it says, so no word about it
    assert all(" does not apply: " in line for line in compiled.warnings)
    # rms_norm: torch_fp32 is what the model's own norm does: no warning for it.
    assert not any("rms_norm" in line for line in compiled.warnings)


def test_split_distributed_form_clipping_and_mlflow():
    compiled = compile_fixture("split_distributed.yaml")
    cfg = compiled.validated
    assert cfg.distributed.dp_size == 2
    assert cfg.grad_accumulation_steps() == 4
    assert cfg.clip_grad_norm.max_norm == 0.5
    assert cfg.model.torch_dtype == "auto"
    assert cfg.mlflow.tags == {"team": "chat"}
    assert cfg.dataset.chat_template.startswith("{% for m in messages %}")
    warned = {line.split("`")[1] for line in compiled.warnings}
    assert warned == {"distributed.tp_size: 2", "step_scheduler.save_checkpoint_every_epoch: true"}


def test_overrides_apply_on_top_of_an_automodel_config():
    compiled = compile_fixture("llm_chat_peft.yaml", overrides=["peft=null", "step_scheduler.max_steps=5"])
    assert compiled.validated.peft is None
    assert compiled.validated.step_scheduler.max_steps == 5


def test_unknown_targets_are_refused_all_at_once_and_never_run(tmp_path):
    marker = Path("/tmp/chatft-should-never-exist")
    marker.unlink(missing_ok=True)
    with pytest.raises(ChatftError) as err:
        compile_fixture("foreign_targets.yaml")
    assert err.value.id == "unsupported_target"
    message = err.value.message
    assert "`loss_fn._target_: subprocess.run`" in message
    assert "`optimizer._target_: os.system`" in message
    assert "HellaSwag" in message and "chatft prep" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"recipe": "some.module.OtherRecipe"}, "`recipe._target_: some.module.OtherRecipe`"),
        ({"dataloader": {"collate_fn": "my.module.collate"}}, "`dataloader.collate_fn._target_: my.module.collate`"),
        ({"model": {"_target_": "nemo_automodel.components.models.deepseek_v3.model.DeepseekV3ForCausalLM.from_pretrained"}},
         "DeepseekV3ForCausalLM"),
        ({"optimizer": {"name": "sgd"}}, "AdamW only"),
        ({"_step_recipe": "pkg.mod:Other"}, "_step_recipe"),
    ],
)
def test_other_refusals(config, fragment):
    with pytest.raises(ChatftError) as err:
        translate(config, "training")
    assert err.value.id == "unsupported_target"
    assert fragment in err.value.message


def test_adam_with_weight_decay_is_told_it_gets_adamw():
    cfg, warnings = translate({"optimizer": {"_target_": "torch.optim.Adam", "weight_decay": 0.1}}, "training")
    assert cfg == {"optimizer": {"weight_decay": 0.1}}
    assert warnings == ["`optimizer._target_: torch.optim.Adam` does not apply: chatft uses AdamW: weight decay is "
                        "decoupled, not L2"]


def test_values_matching_chatft_are_dropped_silently():
    cfg, warnings = translate(
        {"distributed": {"tp_size": 1, "cp_size": 1, "sequence_parallel": False},
         "checkpoint": {"model_save_format": "safetensors", "save_consolidated": True},
         "compile": {"enabled": False}},
        "training",
    )
    assert warnings == []
    assert cfg == {"distributed": {}, "checkpoint": {}, "compile": {"enabled": False}}  # compile is chatft's too


@pytest.mark.parametrize(("value", "expected"), [("selective", "selective"), ("full", True), ("none", False)])
def test_activation_checkpointing_words_are_taken_as_they_are(value, expected):
    cfg, warnings = translate({"distributed": {"activation_checkpointing": value}}, "training")
    assert warnings == []
    assert DistributedSection.model_validate(cfg["distributed"]).activation_checkpointing == expected


def test_foreign_launcher_sections_warn_once_each():
    cfg, warnings = translate({"slurm": {"nodes": 2, "account": "x"}, "ci": {"time": "00:10:00"}}, "training")
    assert cfg == {}
    assert [w.split("`")[1] for w in warnings] == ["slurm: {...}", "ci: {...}"]


def test_merge_megatron_only_keys_warn_and_megatron_routes_are_refused():
    cfg, warnings = translate({"backend": "auto", "lora_checkpoint": "a", "output_hf_path": "o", "tp": 1,
                               "cpu": True, "upstream_script": "/opt/x.py"}, "merge")
    assert set(cfg) == {"backend", "lora_checkpoint", "output_hf_path"}
    assert sorted(w.split("`")[1].split(":")[0] for w in warnings) == ["cpu", "tp", "upstream_script"]
    for megatron in ({"backend": "megatron_bridge"}, {"base_megatron_path": "/ckpt/megatron"}):
        with pytest.raises(ChatftError) as err:
            translate({"lora_checkpoint": "a", "output_hf_path": "o", **megatron}, "merge")
        assert err.value.id == "route_not_supported"
        assert "Megatron-Bridge" in err.value.message


def test_explicit_trust_remote_code_is_honoured_with_a_warning():
    cfg, warnings = translate({"model": {"trust_remote_code": True}}, "training")
    assert cfg["model"]["trust_remote_code"] is True
    assert len(warnings) == 1 and "own Python code will run" in warnings[0]
    _, warnings = translate({"model": {"trust_remote_code": False}}, "training")
    assert warnings == []
    cfg, warnings = translate({"lora_checkpoint": "a", "output_hf_path": "o", "trust_remote_code": True}, "merge")
    assert cfg["trust_remote_code"] is True and "`trust_remote_code: true` is honoured" in warnings[0]


def test_automodel_mlflow_resume_and_flatten_depth_are_honoured_or_warned():
    """Training honours both (`resume` continues the run's MLflow run after a restart, `flatten_depth` sets how
    deep params are split); an eval honours flatten_depth and warns once about `resume: true`, having no run to
    continue; `resume: false` is what an eval does anyway."""
    compiled = compile_fixture("split_distributed.yaml", overrides=["mlflow.resume=false", "mlflow.flatten_depth=2"])
    assert (compiled.validated.mlflow.resume, compiled.validated.mlflow.flatten_depth) == (False, 2)
    assert not any("mlflow" in line for line in compiled.warnings)
    assert compile_fixture("split_distributed.yaml").validated.mlflow.resume is True  # AutoModel's default

    def eval_compiled(*overrides: str):
        return compile_config(resolve_step("eval/model_eval"), "default",
                              ["mlflow.tracking_uri=file:mlruns", "mlflow.flatten_depth=1", *overrides])

    warned = eval_compiled("mlflow.resume=true")
    assert warned.warnings == ["`mlflow.resume: true` does not apply: each eval starts an MLflow run of its own; "
                               "only training runs continue their MLflow run when they resume"]
    assert warned.validated.mlflow.flatten_depth == 1 and "resume" not in warned.effective()["mlflow"]
    assert eval_compiled("mlflow.resume=false").warnings == []
