"""A hub id that cannot be reached (no network) is one line that says how to skip the network."""

from __future__ import annotations

import pytest
from conftest import POSTS

from tldr_rlhf import cli
from tldr_rlhf.errors import DataError, ModelLoadError


def _offline_error():
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.")
    except OSError:
        try:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot find the requested files in the local cache.")
        except LocalEntryNotFoundError as e:
            return e


HINT = ("set HF_HUB_OFFLINE=1 to use the local cache without the network, or give a local path "
        "(folder, .json/.jsonl file, .gguf file)")


@pytest.mark.parametrize("loader", ["load_tokenizer", "load_causal_lm"])
def test_unreachable_hub_is_one_line_for_models(loader, monkeypatch, capsys):
    import transformers

    from tldr_rlhf import modeling

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cls = "AutoTokenizer" if loader == "load_tokenizer" else "AutoModelForCausalLM"

    def offline(*a, **k):
        raise _offline_error()

    monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", offline)
    what = "tokenizer" if loader == "load_tokenizer" else "model"
    with pytest.raises(ModelLoadError) as e:
        getattr(modeling, loader)("Qwen/Qwen2.5-0.5B")
    assert str(e.value) == f"could not reach the Hugging Face hub for {what} 'Qwen/Qwen2.5-0.5B'; {HINT}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        getattr(modeling, loader)("Qwen/Qwen2.5-0.5B")
    assert str(e.value) == (f"{what} 'Qwen/Qwen2.5-0.5B' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                            "download it once with the network on, or give a local path")
    # through the command: one line, exit 2
    monkeypatch.delenv("HF_HUB_OFFLINE")
    if loader == "load_tokenizer":
        assert cli.main(["stats", "--posts", str(POSTS), "--tokenizer", "Qwen/Qwen2.5-0.5B"]) == 2
        assert capsys.readouterr().err == f"tldr-rlhf: error: could not reach the Hugging Face hub for tokenizer 'Qwen/Qwen2.5-0.5B'; {HINT}\n"


def test_other_load_failures_keep_their_own_message(monkeypatch):
    import transformers

    from tldr_rlhf import modeling

    def broken(*a, **k):
        raise ValueError("Unrecognized model in x. Should have a `model_type` key")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(ModelLoadError, match=r"^cannot load tokenizer from 'org/x' \(ValueError: Unrecognized model"):
        modeling.load_tokenizer("org/x")


def test_unreachable_hub_is_one_line_for_datasets(monkeypatch):
    import datasets

    from tldr_rlhf.data.tldr import load_hub_rows

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/summarize_from_feedback' on the Hub (ConnectionError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_hub_rows("openai/summarize_from_feedback", "train", "comparisons")
    assert str(e.value) == f"could not reach the Hugging Face hub for dataset 'openai/summarize_from_feedback'; {HINT}"


def test_without_network_a_hub_id_fails_at_once_with_the_real_loader(monkeypatch, tmp_path):
    """No mock of transformers: the hub's host does not resolve, so the id is looked up in the (empty)
    cache only, and the error comes at once instead of after ~50 s of retries."""
    import socket
    import time

    from tldr_rlhf import modeling

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    modeling.hub_host_resolves.cache_clear()
    try:
        assert modeling.offline_kwargs("org/some-model") == {"local_files_only": True}
        assert modeling.offline_kwargs(str(tmp_path)) == {}  # a local folder never asks the hub
        start = time.perf_counter()
        with pytest.raises(ModelLoadError) as e:
            modeling.load_tokenizer("org/some-model")
        assert str(e.value) == f"could not reach the Hugging Face hub for tokenizer 'org/some-model'; {HINT}"
        assert time.perf_counter() - start < 10
    finally:
        modeling.hub_host_resolves.cache_clear()


def test_without_network_a_hub_dataset_fails_at_once_with_the_real_loader(monkeypatch, tmp_path):
    """No mock of datasets: the hub's host does not resolve, so datasets runs in offline mode for the
    call (cache only) and the one-line error comes at once instead of after ~30 s of retries; the
    offline switches are restored afterwards."""
    import socket
    import time

    import datasets
    import huggingface_hub.constants

    from tldr_rlhf import modeling
    from tldr_rlhf.data.tldr import load_hub_rows

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    modeling.hub_host_resolves.cache_clear()
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    try:
        start = time.perf_counter()
        with pytest.raises(DataError) as e:
            load_hub_rows("no-such-user/no-such-dataset", "train")
        assert str(e.value) == f"could not reach the Hugging Face hub for dataset 'no-such-user/no-such-dataset'; {HINT}"
        assert time.perf_counter() - start < 10
        assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before
    finally:
        modeling.hub_host_resolves.cache_clear()
