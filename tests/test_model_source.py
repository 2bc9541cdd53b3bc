"""Where a model comes from: a local folder or a Hub id, refused before transformers (or the Hub) is asked."""

from __future__ import annotations

import pytest

from chatft.config.schema import ModelSection
from chatft.errors import ChatftError


@pytest.fixture
def no_transformers_load(monkeypatch):
    """Any load that reaches transformers fails the test: the refusal must come first."""
    import transformers

    def called(*args, **kwargs):
        raise AssertionError(f"transformers was asked to load {args[:1]}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", called)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("value", ["./no/such/dir", "../no-such", "no/such/dir", "/no/such/model", "~/no-such-model",
                                   "weights\\model"])
def test_a_missing_path_is_named_as_a_path(value, no_transformers_load, monkeypatch):
    from chatft.train.model import load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a path is never looked up on the Hub, online or not
    with pytest.raises(ChatftError) as caught:
        load_tokenizer(ModelSection(pretrained_model_name_or_path=value))
    error = caught.value
    assert error.id == "config_invalid"
    assert f"cannot load model.pretrained_model_name_or_path={value}: the path " in error.message
    assert "does not exist locally" in error.message and "Repo id" not in error.message


def test_the_nearest_existing_folder_is_named(tmp_path, no_transformers_load):
    from chatft.train.model import load_tokenizer

    (tmp_path / "models").mkdir()
    with pytest.raises(ChatftError) as caught:
        load_tokenizer(ModelSection(pretrained_model_name_or_path=str(tmp_path / "models" / "mine" / "final")))
    assert f"{tmp_path / 'models'} exists" in caught.value.hint


def test_an_uncached_hub_id_offline_is_refused_without_a_lookup(offline_empty_cache, no_transformers_load):
    from chatft.train.model import load_tokenizer

    with pytest.raises(ChatftError) as caught:
        load_tokenizer(ModelSection(pretrained_model_name_or_path="some-org/some-model"), key="base")
    assert "cannot load base=some-org/some-model: it is not a local folder" in caught.value.message
    assert "not in the local Hugging Face cache" in caught.value.message and "HF_HUB_OFFLINE" in caught.value.message
    assert "hf download some-org/some-model" in caught.value.hint


def test_a_cached_hub_id_offline_goes_to_transformers(offline_empty_cache, no_transformers_load):
    from chatft.train.model import load_tokenizer

    (offline_empty_cache / "models--some-org--some-model" / "snapshots" / "abc123").mkdir(parents=True)
    with pytest.raises(AssertionError, match="transformers was asked"):
        load_tokenizer(ModelSection(pretrained_model_name_or_path="some-org/some-model"))


def test_a_local_folder_named_like_a_hub_id_is_local(tmp_path, monkeypatch, offline_empty_cache, no_transformers_load):
    from chatft.train.model import load_tokenizer

    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="transformers was asked"):
        load_tokenizer(ModelSection(pretrained_model_name_or_path="org/name"))
