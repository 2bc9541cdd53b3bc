"""Shared pytest fixtures: tiny random models (fast) and the real demo model (slow)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def load_module_from_path(name: str, path: Path) -> ModuleType:
    """Import a helper module by file path.

    tests/ and scripts/ are not packages, and names like ``fixtures`` could clash
    with installed distributions, so we import by path under a unique name. The
    module is registered in sys.modules so dataclasses/enums inside it behave.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tiny_models = load_module_from_path("chatft_tests_tiny_models", TESTS_DIR / "fixtures" / "tiny_models.py")


@pytest.fixture(scope="session")
def tiny_models_module() -> ModuleType:
    """The tiny_models factory module, for tests that build custom variants."""
    return tiny_models


# Built once per test run; tests must treat these dirs as read-only
# (copy them first if a test needs to modify files).
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_variant(tmp_path_factory.mktemp("tiny-chatml"), "chatml")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    """The tiny model's tokenizer as training loads it (a test module may define its own `tokenizer`)."""
    from chatft.train.model import load_tokenizer

    train_rows = load_module_from_path("chatft_tests_train_rows", TESTS_DIR / "fixtures" / "train_rows.py")
    return load_tokenizer(train_rows.training_config(tiny_model_dir, Path("unused")).model)


@pytest.fixture(scope="session")
def tiny_model_no_template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_variant(tmp_path_factory.mktemp("tiny-no-template"), "no_template")


@pytest.fixture(scope="session")
def tiny_model_other_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_variant(tmp_path_factory.mktemp("tiny-other-weights"), "other_weights")


# Mixture-of-experts models with the same tokenizer and template (read-only, like the others).
@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_variant(tmp_path_factory.mktemp("tiny-qwen3-moe"), "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_variant(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Real SmolLM2-135M-Instruct as a plain HF dir (converted once, cached outside the repo)."""
    get_demo_model = load_module_from_path("chatft_get_demo_model", REPO_ROOT / "scripts" / "get_demo_model.py")
    try:
        return get_demo_model.ensure_demo_model()
    except get_demo_model.DemoModelUnavailable as exc:
        # `make test` installs the model's package, so in CI a missing model is a failure, not a skip.
        if os.environ.get("CI"):
            pytest.fail(f"demo model unavailable in CI: {exc}")
        pytest.skip(str(exc))
