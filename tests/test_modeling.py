"""Model and tokenizer loading: GGUF, pad = EOS, dropout off (N+ detail 7), LoRA, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EOS, QWEN_TOKENIZER, SMOL_GGUF, make_tiny_qwen2

from tldr_rlhf.errors import ModelLoadError
from tldr_rlhf.modeling import apply_lora, disable_dropout, load_causal_lm, load_tokenizer, save_pretrained


def test_qwen_tokenizer_pad_is_eos(qwen_tokenizer):
    assert qwen_tokenizer.eos_token_id == qwen_tokenizer.pad_token_id == EOS
    assert qwen_tokenizer.padding_side == "left"
    assert qwen_tokenizer.encode("Hello world") == [9707, 1879]


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist: .*m.gguf"):
        load_tokenizer(str(tmp_path / "m.gguf"))


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer("no-such-org/no-such-model")
    assert str(e.value) == ("tokenizer 'no-such-org/no-such-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                            "is set; download it once with the network on, or give a local path")


def test_tokenizer_without_eos_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text((QWEN_TOKENIZER / "tokenizer.json").read_text())
    cfg = json.loads((QWEN_TOKENIZER / "tokenizer_config.json").read_text())
    cfg.update(eos_token=None, pad_token=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has no EOS token"):
        load_tokenizer(str(tmp_path))


def test_nplus_7_dropout_disabled_everywhere():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=99, eos_token_id=99, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3))
    disable_dropout(model)
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()
    x = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)  # no randomness in train mode


def test_lora_trains_adapters_only_and_saves_merged(tmp_path, qwen_tokenizer):
    model = apply_lora(make_tiny_qwen2(), r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapters non-zero so merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randint(0, 1000, (2, 7))
    want = model(x).logits
    save_pretrained(model, qwen_tokenizer, tmp_path / "merged")
    reloaded = load_causal_lm(str(tmp_path / "merged"))
    assert not any("lora" in k for k in reloaded.state_dict())
    torch.testing.assert_close(reloaded(x).logits, want, atol=1e-4, rtol=1e-4)


def test_gguf_loads_dequantized_and_saves_as_a_normal_checkpoint(tmp_path):
    """The real SmolLM2-135M GGUF: loads offline, saves as safetensors, reloads to identical logits."""
    tok = load_tokenizer(str(SMOL_GGUF))
    assert tok.eos_token_id == tok.pad_token_id == 2  # <|im_end|>
    model = load_causal_lm(str(SMOL_GGUF), tokenizer=tok)
    assert getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        logits = model(ids).logits
    assert tok.decode([int(logits[0, -1].argmax())]) == " Paris"
    save_pretrained(model, tok, tmp_path / "smol")
    assert (tmp_path / "smol" / "model.safetensors").exists()
    again = load_causal_lm(str(tmp_path / "smol"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits, rtol=0, atol=0)


def test_nplus_9_position_ids_from_mask_for_left_padded_absolute_positions():
    """GPT-2 has absolute position embeddings: a left-padded row must get positions 0.. from its
    first real token (cumsum(mask) - 1), or its logits change (seed: the reward model did not train)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tldr_rlhf.data.batching import collate_query_response
    from tldr_rlhf.modeling import response_logits

    torch.manual_seed(0)
    model = disable_dropout(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=99, eos_token_id=99))).eval()
    batch = collate_query_response([[5, 6, 7, 8], [9]], [[10, 11], [12, 13]], pad_token_id=0)
    assert batch.input_ids[1].tolist() == [0, 0, 0, 9, 12, 13]
    padded = response_logits(model, batch.input_ids, batch.attention_mask, batch.query_width)
    alone = model(torch.tensor([[9, 12, 13]])).logits[0, :2]  # no padding at all: positions 0, 1, 2
    torch.testing.assert_close(padded[1], alone, atol=1e-5, rtol=1e-5)
    from tldr_rlhf.ops import position_ids_from_mask

    assert position_ids_from_mask(batch.attention_mask)[1].tolist() == [0, 0, 0, 0, 1, 2]


def test_nplus_8_adamw_settings():
    from tldr_rlhf.config import OptimArgs
    from tldr_rlhf.train.loop import build_optimizer

    model = make_tiny_qwen2()
    opt = build_optimizer(model.parameters(), OptimArgs())
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups
    assert g[0]["betas"] == (0.9, 0.95) and g[0]["eps"] == 1e-5 and g[0]["weight_decay"] == 0.1
    assert g[1]["weight_decay"] == 0.0 and all(p.ndim < 2 for p in g[1]["params"])  # norms and biases: no decay
    with pytest.raises(RuntimeError, match="8-bit AdamW is unavailable"):
        build_optimizer(model.parameters(), OptimArgs(optim_8bit="on"))  # no CUDA here


def test_checkpoint_kind_from_config_json_alone(tmp_path, qwen_tokenizer):
    """Policy or reward model, told from config.json (no weights loaded); unknown passes."""
    from rl_fixtures import make_checkpoints

    from tldr_rlhf.checkpoints import checkpoint_kind, kind_from_config, require_kind

    sft, rm = make_checkpoints(qwen_tokenizer)
    assert checkpoint_kind(sft) == "policy" and checkpoint_kind(rm) == "reward_model"
    assert checkpoint_kind(str(SMOL_GGUF)) == "policy"
    assert checkpoint_kind(str(tmp_path / "missing")) == "unknown" and checkpoint_kind(str(tmp_path)) == "unknown"
    assert kind_from_config({"architectures": ["Qwen2ForSequenceClassification"], "model_type": "qwen2"}) == "reward_model"
    assert kind_from_config({"architectures": ["GPT2LMHeadModel"]}) == "policy"
    assert kind_from_config({"model_type": "qwen2"}) == "unknown"
    require_kind(sft, "policy", "--model")
    require_kind(str(tmp_path), "policy", "--model")  # unknown: the loader decides
    with pytest.raises(ModelLoadError, match=rf"^--rm-path {sft} is a causal LM policy, not a reward model$"):
        require_kind(sft, "reward_model", "--rm-path")
    with pytest.raises(ModelLoadError, match=rf"^--model {rm} is a reward model, not a policy$"):
        require_kind(rm, "policy", "--model")


@pytest.mark.parametrize("argv", [["ppo", "--preset", "nplus"], ["ppo", "--preset", "seed"], ["dpo", "--preset", "nplus"]])
def test_nplus_8_presets_use_plain_adamw_on_cuda_with_bitsandbytes(argv, monkeypatch):
    # N+ used plain AdamW. The N+ presets (and PPO's seed preset, which takes N+'s optimizer) say
    # so with optim_8bit="off": with bitsandbytes importable and a CUDA device type, "auto" would
    # pick its 8-bit AdamW (the fake below stands in for it); "off" keeps torch AdamW.
    import dataclasses
    import sys
    import types

    from tldr_rlhf.cli import parse
    from tldr_rlhf.train.loop import build_optimizer

    class FakeAdamW8bit:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)))
    optim = parse(argv)[1].optim
    assert optim.optim_8bit == "off"
    params = list(torch.nn.Linear(4, 4).parameters())
    assert type(build_optimizer(params, optim, device_type="cuda")) is torch.optim.AdamW
    assert type(build_optimizer(params, dataclasses.replace(optim, optim_8bit="auto"), device_type="cuda")) is FakeAdamW8bit
