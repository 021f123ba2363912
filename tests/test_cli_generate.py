"""The command line (presets, overrides, errors) and generation (left padding, EOS stop)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EOS, POSTS

from tldr_rlhf import cli
from tldr_rlhf.presets import SFT_PRESETS
from tldr_rlhf.generation import generate


def test_preset_then_override():
    fn, cfg = cli.parse(["sft", "--preset", "cpu-smol", "--optim.lr", "0.5", "--run.max-steps", "3"])
    assert cfg.optim.lr == 0.5 and cfg.run.max_steps == 3
    assert cfg.model.path == SFT_PRESETS["cpu-smol"].model.path  # untouched fields keep the preset's value
    _, seed = cli.parse(["sft"])
    assert seed == SFT_PRESETS["seed"]
    assert seed.optim.betas == (0.9, 0.95) and seed.optim.weight_decay == 0.1 and seed.optim.lr == 3e-6
    assert seed.global_batch_size() == 128  # 16 x 8


def test_unknown_command_and_preset_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["nope"])
    assert e.value.code == 2 and "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.parse(["sft", "--preset", "nope"])
    assert e.value.code == 2 and "unknown preset" in capsys.readouterr().err


def test_main_reports_errors_without_traceback(capsys, tmp_path):
    rc = cli.main(["generate", "--model", str(tmp_path / "missing"), "--post", "hello"])
    assert rc == 2
    assert "model path does not exist" in capsys.readouterr().err


def test_generate_left_padded_batch_equals_one_by_one(tiny_model):
    """Greedy responses do not depend on the batch's left padding, and stop at the first EOS."""
    queries = [[100, 200, 300, 400, 500], [7, 8]]
    batched = generate(tiny_model, queries, eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=6, greedy=True, batch_size=2)
    single = [generate(tiny_model, [q], eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=6, greedy=True)[0] for q in queries]
    assert batched == single
    assert all(len(r) == 6 or r[-1] == EOS for r in batched)


def test_generate_refuses_min_new_tokens(tiny_model):
    with pytest.raises(ValueError, match="suppresses EOS"):
        generate(tiny_model, [[1, 2]], eos_token_id=EOS, pad_token_id=EOS, min_new_tokens=5)


def test_generate_command_on_real_posts(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "summaries.jsonl"
    rc = cli.main(["generate", "--model", str(tiny_model_dir), "--posts", str(POSTS), "--limit", "2", "--max-new-tokens", "4", "--greedy", "--output", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["oai1b-0000", "oai1b-0001"]
    assert records[0]["reference"].startswith("long relationship; fell in love")
    assert "summary:" in capsys.readouterr().out


def test_stats_command(capsys):
    rc = cli.main(["stats", "--posts", str(POSTS), "--tokenizer", str(POSTS.parents[3] / "tokenizers" / "qwen2.5")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["query"]["n"] == 1600 and report["response"]["max"] == 52  # longest real reference: 52 tokens
    assert report["query"]["max"] <= 512


def test_no_sampling_randomness_leaks_into_greedy(tiny_model):
    torch.manual_seed(1)
    a = generate(tiny_model, [[5, 6, 7]], eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=4, greedy=True)
    torch.manual_seed(2)
    b = generate(tiny_model, [[5, 6, 7]], eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=4, greedy=True)
    assert a == b


def test_generate_answers_an_instruction_in_the_ultrafeedback_prompt_format(tiny_model_dir, tmp_path, qwen_tokenizer):
    from tldr_rlhf.data.ultrafeedback import prompt_ids
    from tldr_rlhf.generation import decode_response
    from tldr_rlhf.modeling import load_causal_lm

    out = tmp_path / "answers.jsonl"
    rc = cli.main(["generate", "--model", str(tiny_model_dir), "--instruction", "Name a color.", "--max-new-tokens", "3", "--greedy", "--output", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    query = prompt_ids(qwen_tokenizer, "Name a color.")  # plain template: this tokenizer has no chat template
    assert qwen_tokenizer.decode(query) == "### Instruction:\nName a color.\n\n### Response:\n"
    expected = generate(load_causal_lm(str(tiny_model_dir)), [query], eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=3, greedy=True)[0]
    assert record["id"] == "instruction" and record["summary"] == decode_response(qwen_tokenizer, expected)
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--instruction", "x", "--post", "y"]) == 2


def test_generate_refuses_a_reward_model_without_asking_on_stdin(qwen_tokenizer, monkeypatch, capsys):
    """A reward model's final/ given to generate: one error line, exit 2, before anything loads, and
    never transformers' "Do you wish to run the custom code? [y/N]" waiting on stdin."""
    import io

    from rl_fixtures import make_checkpoints

    sft, rm = make_checkpoints(qwen_tokenizer)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc = cli.main(["generate", "--model", rm, "--post", "hello", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip().splitlines()[-1] == f"tldr-rlhf: error: --model {rm} is a reward model, not a policy"
    assert "custom code" not in captured.out + captured.err


def test_loading_a_reward_model_folder_as_a_policy_raises_instead_of_prompting(qwen_tokenizer):
    """In a fresh process (the reward model class not registered), the loaders pass
    trust_remote_code=False: transformers raises (a ModelLoadError for the user) instead of asking
    on stdin whether to run the checkpoint's reward_model.py."""
    import subprocess
    import sys

    from rl_fixtures import make_checkpoints

    sft, rm = make_checkpoints(qwen_tokenizer)
    code = (
        "import sys\n"
        "from tldr_rlhf.errors import ModelLoadError\n"
        "from tldr_rlhf.modeling import load_causal_lm\n"
        f"try:\n    load_causal_lm({rm!r})\nexcept ModelLoadError as e:\n    print('ModelLoadError', e)\n"
        "assert 'tldr_rlhf.reward.reward_model' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ModelLoadError cannot load model from" in out.stdout and "trust_remote_code" in out.stdout
    assert "Do you wish to run the custom code" not in out.stdout + out.stderr


def test_generate_with_vllm_missing_is_one_line_naming_the_extra(tiny_model_dir, monkeypatch, capsys):
    """--rollout-engine vllm where the vllm package is not installed: exit 2 and the install line,
    before the model loads (the vllm venv's greedy-equality test is tests/test_vllm_generate.py)."""
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find(name, *a))
    monkeypatch.setattr("tldr_rlhf.modeling.load_causal_lm", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--post", "hello", "--rollout-engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'tldr-rlhf[vllm]'" in err
