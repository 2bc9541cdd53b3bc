"""Which base model a LoRA adapter belongs to: one rule for convert/merge_lora and eval/model_eval.

In: an adapter dir (its chatft_manifest.json and adapter_config.json) and the base the step's config names
(`base_hf_path` for merge, `base` for eval), if any. Out: an `AdapterBase` (the base to load the adapter on, and
how far it was checked) or a refusal. Torch-free: both steps decide before any model is loaded (merge in
`plan_merge`, eval in its preflight).

The rule:
- the base is the configured one; else the one the adapter's manifest records (with its revision); else the one
  its adapter_config.json names (`base_model_name_or_path`, `revision`); else `config_invalid`;
- a configured local path that holds no weight files is `config_invalid`;
- the base's weights fingerprint must equal the one the adapter's manifest records, else `base_model_mismatch`
  (a configured base that is another model, or the recorded base changed in place since training);
- an adapter with no recorded fingerprint (saved by another tool): a configured base is compared with the base
  its adapter_config.json names, where both are local (`base_model_mismatch` when their weights differ);
- what could not be checked is said in `AdapterBase.unverified` (merge prints it as a warning, eval as a note in
  its results): no fingerprint recorded, or the base's weights not local yet (a Hub id not downloaded).
  `require_local=True` (merge, whose checks run before anything is downloaded) refuses the latter with
  `config_invalid`; eval loads the base and calls `check_weights` again once the weights are in the cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatft import artifacts
from chatft.errors import ChatftError

NO_FINGERPRINT_NOTE = "base not verified: the adapter has no chatft manifest recording its base's weights"


@dataclass
class AdapterBase:
    """The base an adapter is loaded on, where it came from, and what its weights were checked against."""

    adapter_dir: Path
    key: str  # the config key that may name the base: base_hf_path | base
    configured: str | None  # that key's value, as given
    name_or_path: str  # the base to load: an absolute local dir, or a Hub id
    revision: str | None
    source: str  # where the base came from: config | manifest | adapter_config
    named: str | None  # the base the adapter's own files name (manifest first, else adapter_config.json)
    named_revision: str | None
    named_in: str  # the file that names it
    recorded_fingerprint: str | None  # the base's weights fingerprint the manifest records
    fingerprint: str | None = None  # the base's weights fingerprint here; None while they are not local
    unverified: str | None = None  # why the weights could not be checked, or None when they were

    @property
    def given(self) -> str:
        """How messages name a configured base: `key=value`, as the user wrote it."""
        return f"{self.key}={self.configured}"


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json as a dict; `adapter_not_found` when it cannot be read."""
    path = adapter_dir / artifacts.ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ChatftError("adapter_not_found", f"{path} cannot be read as JSON: {str(exc).splitlines()[0]}",
                          "the adapter dir is damaged; save the adapter again or point to another adapter") from None


def local_location(name_or_path: str) -> str:
    """A local dir as an absolute path; a Hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def _short(fingerprint: str | None) -> str:
    return fingerprint[:12] if fingerprint else "unknown"


def resolve_adapter_base(adapter_dir: Path, key: str, configured: str | None = None, *,
                         locate: Callable[[str], str] = local_location,
                         require_local: bool = False) -> AdapterBase:
    """The base `adapter_dir` is loaded on, checked by the rule above. `locate` turns the configured value into a
    location (eval resolves a training run dir to its final/); `require_local` refuses a base whose weights are
    not here to check."""
    manifest = artifacts.read_manifest(adapter_dir) or {}
    recorded = manifest.get("base_model") or {}
    adapter_config = read_adapter_config(adapter_dir)
    if recorded.get("name_or_path"):
        named, named_revision, named_in = recorded["name_or_path"], recorded.get("revision"), artifacts.MANIFEST_FILE
    else:
        named, named_revision = adapter_config.get("base_model_name_or_path"), adapter_config.get("revision")
        named_in = artifacts.ADAPTER_CONFIG
    if configured is not None:
        location, revision, source = locate(configured), None, "config"
    elif named:
        location, revision = local_location(named), named_revision
        source = "manifest" if named_in == artifacts.MANIFEST_FILE else "adapter_config"
    else:
        raise ChatftError(
            "config_invalid",
            f"{key} is unset and the adapter {adapter_dir} names no base model (no chatft_manifest.json records "
            f"one, and its adapter_config.json has no base_model_name_or_path)",
            f"set {key} to the model the adapter was trained on",
        )
    base = AdapterBase(adapter_dir, key, configured, location, revision, source, named, named_revision, named_in,
                       recorded.get("fingerprint"))
    return check_weights(base, require_local=require_local)


def check_weights(base: AdapterBase, *, require_local: bool = False) -> AdapterBase:
    """Fingerprint the base where its weights are local (again, if they were not before) and hold it against the
    adapter's record; sets `base.unverified`. Raises `base_model_mismatch` on other weights."""
    if base.fingerprint is None:
        base.fingerprint = artifacts.weights_fingerprint(base.name_or_path, base.revision)
    found = base.fingerprint
    if base.configured is not None and found is None and Path(base.name_or_path).expanduser().exists():
        raise ChatftError("config_invalid", f"{base.key}={base.configured} holds no weight files",
                          "give a save_pretrained dir (config.json and *.safetensors) or a cached Hub id")
    if base.recorded_fingerprint is not None:
        _check_recorded(base, require_local)
    else:
        _check_named(base)
    return base


def _check_recorded(base: AdapterBase, require_local: bool) -> None:
    """The adapter's manifest records its base's weights fingerprint: the base here must have it."""
    found, recorded = base.fingerprint, base.recorded_fingerprint
    if found is None and not require_local:  # eval: checked again once loading has fetched the weights
        base.unverified = f"base not verified: the weights of {base.name_or_path} are not local"
        return
    if found is None and base.configured is None:
        raise ChatftError(
            "config_invalid",
            f"the adapter's base {base.named} (from its {base.named_in}) is not here: not a local dir, nor in "
            "the Hugging Face cache",
            f"set {base.key} to where that model is now (a local copy is checked by its fingerprint), or "
            "download it into the cache first",
        )
    if found is None:
        raise ChatftError(
            "config_invalid",
            f"{base.given} is not a local dir nor in the Hugging Face cache, so it cannot be checked against "
            f"the base the adapter records ({base.named})",
            "give a local dir, or download the model into the cache first",
        )
    base.unverified = None
    if found == recorded:
        return
    if base.configured is None:
        raise ChatftError(
            "base_model_mismatch",
            f"the base at {base.name_or_path} has changed since the adapter {base.adapter_dir} was trained on it: "
            f"weights fingerprint {_short(found)} now, {_short(recorded)} recorded",
            f"restore that model, or set {base.key} to an unchanged copy of it",
        )
    raise ChatftError(
        "base_model_mismatch",
        f"{base.given} (weights fingerprint {_short(found)}) is not the model the adapter {base.adapter_dir} was "
        f"trained on: {base.named} (fingerprint {_short(recorded)}, from its {base.named_in})",
        f"omit {base.key} to use the recorded base, or give that exact model (a local copy of it has the same "
        "fingerprint)",
    )


def _check_named(base: AdapterBase) -> None:
    """No fingerprint recorded (an adapter from another tool): a configured base is compared with the base the
    adapter's adapter_config.json names, where both are here."""
    base.unverified = NO_FINGERPRINT_NOTE
    if base.configured is None or not base.named or local_location(base.named) == base.name_or_path:
        return
    named_found = artifacts.weights_fingerprint(local_location(base.named), base.named_revision)
    if named_found is None:
        base.unverified = (f"{NO_FINGERPRINT_NOTE}; the base its {base.named_in} names, {base.named}, is not here "
                           f"to compare with {base.given}")
        return
    if base.fingerprint is None:
        base.unverified = (f"{NO_FINGERPRINT_NOTE}; the weights of {base.given} are not local, to compare with the "
                           f"base its {base.named_in} names ({base.named})")
        return
    if named_found != base.fingerprint:
        raise ChatftError(
            "base_model_mismatch",
            f"{base.given} (weights fingerprint {_short(base.fingerprint)}) is not the model the adapter "
            f"{base.adapter_dir} was trained on: {base.named} (fingerprint {_short(named_found)}, named by its "
            f"{base.named_in})",
            f"omit {base.key} to use the base its {base.named_in} names, or give that exact model",
        )
