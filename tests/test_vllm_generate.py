"""``tldr-rlhf generate --rollout-engine vllm`` against the default hf sampler on the same checkpoint:
greedy summaries token for token equal (the printed records and the --output file), on real posts
with the real tokenizer. Needs the ``vllm`` extra (``make test-vllm``)."""

import json

import pytest

import vllm  # noqa: F401  (collected only where the vllm extra is installed: conftest.py)

from tldr_rlhf import cli  # noqa: E402

from conftest import POSTS  # noqa: E402
from test_vllm_stages import vckpts  # noqa: E402,F401  (the module fixture: a policy vLLM's CPU attention takes)

pytestmark = pytest.mark.vllm


def test_generate_greedy_with_vllm_equals_hf_token_for_token(vckpts, tmp_path, monkeypatch):  # noqa: F811
    sft, _ = vckpts
    seen = {}
    from tldr_rlhf import generation

    real_decode = generation.decode_response

    def decode(tok, ids):  # the token ids each engine produced, not only their text
        seen.setdefault(engine, []).append(list(ids))
        return real_decode(tok, ids)

    monkeypatch.setattr(generation, "decode_response", decode)
    records = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        args = ["generate", "--model", sft, "--posts", str(POSTS), "--limit", "4", "--response-length", "12", "--greedy", "--output", str(out)]
        assert cli.main(args + ["--rollout-engine", engine]) == 0
        records[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(seen["hf"]) == 4 and all(len(ids) > 0 for ids in seen["hf"])
    assert seen["vllm"] == seen["hf"]
    assert records["vllm"] == records["hf"]
