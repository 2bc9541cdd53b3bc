"""Manifests and fingerprints: what every chatft artifact says about itself.

In: a model location (local dir or Hub id), a tokenizer, data reports, the resolved config, metrics.
Out: `chatft_manifest.json` beside the weights of `final/` (and of merged outputs), and the fingerprints the
merge step compares to make sure an adapter meets the base it was trained on.

- weights fingerprint: sha256 over the weight files' own sha256 digests (hex, one per line, in file-name
  order). Files in the Hugging Face cache are stored under their sha256 already; those are read from the
  cache's blob name instead of being hashed again.
- tokenizer fingerprint: sha256 of the tokenizer's vocabulary, merges and special tokens (the fast
  tokenizer's JSON), without its chat template, which has its own `chat_template_sha256`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from chatft import __version__
from chatft.errors import ChatftError

MANIFEST_FILE = "chatft_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
_digest_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (cached per path, size and mtime within the process)."""
    path = Path(path)
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _SHA256_NAME.match(target.name):
        return target.name  # Hugging Face cache: LFS blobs are named by their sha256
    stat = target.stat()
    key = (str(target), stat.st_size, stat.st_mtime_ns)
    if key not in _digest_cache:
        digest = hashlib.sha256()
        with open(target, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _digest_cache[key] = digest.hexdigest()
    return _digest_cache[key]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weight_files(model_dir: str | Path) -> list[Path]:
    root = Path(model_dir)
    return sorted(p for p in root.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("."))


def local_model_dir(name_or_path: str, revision: str | None = None) -> Path | None:
    """The local dir holding a model: the path itself, or the Hub cache snapshot (no download)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True,
                                      allow_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES]))
    except Exception:  # not cached, or not a repo id: the fingerprint is then unknown
        return None


def weights_fingerprint(name_or_path: str | Path, revision: str | None = None) -> str | None:
    directory = local_model_dir(str(name_or_path), revision)
    if directory is None:
        return None
    files = weight_files(directory)
    if not files:
        return None
    return text_sha256("".join(file_sha256(f) + "\n" for f in files))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow tokenizer: the vocabulary is what defines it
        body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    specials = json.dumps(
        {"special": sorted(map(str, tokenizer.all_special_tokens)), "eos": tokenizer.eos_token,
         "pad": tokenizer.pad_token, "bos": tokenizer.bos_token}, sort_keys=True)
    return text_sha256(body + "\n" + specials)


def chat_template_sha256(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    return text_sha256(template if isinstance(template, str) else json.dumps(template, sort_keys=True))


def recorded_template_kwargs(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The `dataset.chat_template_kwargs` a run rendered its rows with (e.g. `{enable_thinking: false}`), from its
    manifest's resolved config; empty when the manifest records none."""
    dataset = (((manifest or {}).get("config") or {}).get("dataset") or {})
    kwargs = dataset.get("chat_template_kwargs") if isinstance(dataset, dict) else None
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def end_of_turn_token_id(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> int | None:
    """The token the chat template puts right after an assistant message (`<|im_end|>`, `<|eot_id|>`):
    generation must stop there. `template_kwargs`: the variables the run's renders got
    (`dataset.chat_template_kwargs`), since a template may end a turn differently under them. Falls back to the
    tokenizer's EOS."""
    marker = "chatft0turn0marker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False,
            **(template_kwargs or {}))
    except Exception:
        return tokenizer.eos_token_id
    after = text[text.rfind(marker) + len(marker):] if marker in text else ""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
        if tokenizer.decode([token_id]).strip():
            break  # plain text follows the message: the template has no end-of-turn token
    return tokenizer.eos_token_id


def generation_stop_ids(tokenizer: Any, model_eos: int | list[int] | None = None,
                        template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The ids generation stops at, one rule for the trained, merged and evaluated models alike: the model's own
    EOS ids (its generation config's, first and kept), then the chat template's end-of-turn token (rendered with
    the run's `template_kwargs`), then the tokenizer's EOS."""
    ids = [] if model_eos is None else ([model_eos] if isinstance(model_eos, int) else list(model_eos))
    for token_id in (end_of_turn_token_id(tokenizer, template_kwargs), tokenizer.eos_token_id):
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def stop_at_end_of_turn(model: Any, tokenizer: Any, pad_id: int | None = None,
                        template_kwargs: dict[str, Any] | None = None) -> None:
    """Write `generation_stop_ids` into the model's generation config (and a pad id where it has none), so a
    saved model stops at the end of its turn under plain `generate()`."""
    generation = model.generation_config
    ids = generation_stop_ids(tokenizer, generation.eos_token_id, template_kwargs)
    generation.eos_token_id = ids[0] if len(ids) == 1 else ids
    if generation.pad_token_id is None and pad_id is not None:
        generation.pad_token_id = pad_id


# --------------------------------------------------------------------------- manifest

# The packages whose versions every job.yaml and manifest records.
RECORDED_PACKAGES = ("torch", "transformers", "peft", "safetensors", "datasets", "tokenizers", "accelerate")


def package_versions() -> dict[str, str]:
    versions = {"chatft": __version__, "python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions



def build_manifest(
    *,
    kind: str,
    base_model: dict[str, Any],
    tokenizer: Any,
    data: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, Any],
    versions: dict[str, str],
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": 1,
        "kind": kind,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer),
                      "chat_template_sha256": chat_template_sha256(tokenizer)},
    }
    if lora is not None:
        manifest["lora"] = lora
    manifest.update({"data": data, "config": config, "metrics": metrics, "versions": versions, "validations": []})
    return manifest


def base_model_record(name_or_path: str, revision: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {"name_or_path": name_or_path}
    if revision is not None:
        record["revision"] = revision
    record["fingerprint"] = weights_fingerprint(name_or_path, revision)
    return record


def lora_record(lora_config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `lora` from a LoRA config (adapter_config.json, or PEFT's `LoraConfig.to_dict()`): rank,
    alpha, dropout, the modules it wraps, and the parameters it adapts without a module of their own (a mixture of
    experts' stacked expert weights, `target_parameters`) where there are any."""
    targets = lora_config.get("target_modules")
    record = {"r": lora_config.get("r"), "alpha": lora_config.get("lora_alpha"),
              "dropout": lora_config.get("lora_dropout"),
              "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets}
    if lora_config.get("target_parameters"):
        record["target_parameters"] = sorted(lora_config["target_parameters"])
    return record


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --------------------------------------------------------------------------- adapters and checkpoints

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MEGATRON_ITER = re.compile(r"^iter_\d+$")


def looks_like_megatron_checkpoint(directory: Path) -> bool:
    """A Megatron(-Bridge) checkpoint: `latest_checkpointed_iteration.txt`, `iter_N/` dirs or torch-dist shards."""
    if (directory / "latest_checkpointed_iteration.txt").is_file():
        return True
    return any((p.is_dir() and _MEGATRON_ITER.match(p.name)) or p.name.endswith(".distcp") for p in directory.iterdir())


def find_adapter_dir(path: str | Path, key: str = "lora_checkpoint") -> Path:
    """The PEFT adapter dir `path` names: the dir itself when it holds `adapter_config.json`, else a training
    run dir's `final/`. chatft's `checkpoints/step_N/` hold resume state (trainable weights, optimizer), not a
    loadable adapter, so they never count. Refuses with `adapter_not_found` (or `route_not_supported` for a
    Megatron checkpoint) naming what was found instead."""
    given = Path(path).expanduser()
    if not given.exists():
        raise ChatftError("adapter_not_found", f"{key}={path} does not exist",
                          f"point {key} at a PEFT adapter dir (holding {ADAPTER_CONFIG}) or a peft/automodel "
                          "run dir (its final/ is used), e.g. runs/peft")
    if given.is_file():
        given = given.parent if given.name == ADAPTER_CONFIG else given
        if given.is_file():
            raise ChatftError("adapter_not_found", f"{key}={path} is a file, not an adapter dir",
                              f"give the dir that holds {ADAPTER_CONFIG}, or the training run dir")
    for candidate in (given, given / "final"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate.resolve()
    if looks_like_megatron_checkpoint(given):
        raise ChatftError("route_not_supported",
                          f"{key}={path} is a Megatron checkpoint, not a PEFT adapter",
                          "merge Megatron LoRA checkpoints with Megatron-Bridge's merge_lora; chatft merges "
                          "PEFT adapters (peft/automodel runs) into HF checkpoints")
    final = given / "final"
    if (given / "config.json").is_file() or (final / "config.json").is_file():
        where = given if (given / "config.json").is_file() else final
        raise ChatftError("adapter_not_found",
                          f"no {ADAPTER_CONFIG} in {where}: it is a full model (checkpoint_hf), not a LoRA adapter",
                          f"a full-SFT or merged model needs no merge, use it as is; for a LoRA run point {key} at "
                          "its run dir or its final/")
    if (given / "trainer_state.json").is_file() or (given / "checkpoints").is_dir():
        what = ("a resumable training checkpoint" if (given / "trainer_state.json").is_file()
                else "a training run dir without final/ (unfinished or stopped)")
        raise ChatftError("adapter_not_found",
                          f"no {ADAPTER_CONFIG} in {given}: it is {what}; checkpoints/step_N hold resume state "
                          "(trainable weights and optimizer), not a PEFT adapter, so only a run's final/ can be merged",
                          "finish the run first (run the same peft/automodel command again: checkpoint.resume=auto "
                          f"continues it and writes final/), then set {key} to the run dir")
    raise ChatftError("adapter_not_found",
                      f"no {ADAPTER_CONFIG} in {given} nor in {final}",
                      f"point {key} at a PEFT adapter dir (holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}) or a "
                      "peft/automodel run dir, e.g. runs/peft")


def adapter_record(adapter_dir: str | Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What a merged model records about the adapter folded into it."""
    record: dict[str, Any] = {"path": str(adapter_dir), "fingerprint": weights_fingerprint(adapter_dir)}
    if manifest is not None:
        record["created"] = manifest.get("created")
        record["validations"] = len(manifest.get("validations") or [])
    return record


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The dtype a checkpoint's weights are stored in: `config.json`'s `dtype` (`torch_dtype` before
    transformers 5), else the first floating tensor of its first safetensors file."""
    directory = Path(model_dir)
    config_path = directory / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        named = config.get("dtype") or config.get("torch_dtype")
        if isinstance(named, str) and named in _SAFETENSORS_DTYPES.values():
            return named
    for path in weight_files(directory):
        if path.suffix != ".safetensors":
            continue
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None
