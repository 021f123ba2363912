"""DPO stage: response log-probs (shared prompt, chunked LM head, padding), cached reference log-probs,
implicit-reward evaluation, a real training step on the real comparisons with a tiny model, resume."""

import copy
import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import COMPARISONS, EOS, QWEN_TOKENIZER, free_port, make_tiny_qwen2
from tldr_rlhf.config import DPOConfig, PreferenceDataArgs as DPODataArgs, OptimArgs, RunArgs
from tldr_rlhf.data.comparisons import PreferenceExample
from tldr_rlhf.errors import DataError
from tldr_rlhf.lm_head import chunked_target_logprobs
from tldr_rlhf.modeling import apply_lora, load_causal_lm
from tldr_rlhf.train import dpo
from tldr_rlhf.tasks import dpo_pairs as load_dpo_data
from tldr_rlhf.train.dpo import (
    collate,
    implicit_reward_accuracy,
    implicit_reward_metrics,
    pair_logprobs,
    reference_logprobs,
)
from tldr_rlhf.scoring import score_preference_pairs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other processes
    (a tiny forward pass goes from 10 ms to 700 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_qwen(seed: int = 0):
    return make_tiny_qwen2(seed=seed).eval()


def examples():
    # query lengths 5 / 3 / 7, responses of 1-5 tokens (ids well inside the vocabulary)
    return [
        PreferenceExample("a", [5, 6, 7, 8, 9], [10, 11, 12], [20, 21]),
        PreferenceExample("b", [1, 2, 3], [13], [22, 23, 24, 25, 26]),
        PreferenceExample("c", [4, 4, 4, 4, 4, 4, 4], [14, 15, 16, 17], [27]),
    ]


def naive_pair_logprobs(model, batch):
    """Full rows through the model, log_softmax over all logits, summed over response positions."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), position_ids=(batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)).logits
    p, t = batch.query_width, batch.responses.shape[1]
    logits = logits[:, p - 1 : p - 1 + t]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1).gather(-1, batch.responses[..., None]).squeeze(-1)
    return (logp * batch.response_mask).sum(1)


def test_chunked_target_logprobs_matches_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (11,))
    g = torch.randn(11, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        ref = torch.log_softmax((h @ w.t() + b) / temperature, -1).gather(1, y[:, None]).squeeze(1)
        grads_ref = torch.autograd.grad((ref * g).sum(), (h, w, b))
        out = chunked_target_logprobs(h, w, b, y, temperature=temperature, vocab_block=7)  # 8 blocks: 7 x 7 + 1
        grads = torch.autograd.grad((out * g.float()).sum(), (h, w, b))
        assert torch.allclose(out.double(), ref, atol=1e-5)
        for a, r in zip(grads, grads_ref):
            assert torch.allclose(a, r, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_qwen, lambda: GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, bos_token_id=299, eos_token_id=299)).eval()])
def test_shared_prompt_and_chunked_head_equal_full_rows_values_and_gradients(make):
    model = make()
    batch = collate(examples(), pad_token_id=0)

    def run(m, fn):
        m.zero_grad()
        lp = fn(m, batch)
        (lp * torch.arange(1.0, 7.0, dtype=lp.dtype)).sum().backward()
        return lp.detach().double(), [p.grad.double() for p in m.parameters()]

    # The exact values: full rows in float64. The float32 paths (full rows, chunked head, shared
    # prompt) add up the same terms in other orders (other attention shapes, the vocabulary a block at
    # a time), so they agree with it only up to float32 rounding, not bit for bit. Every log-prob and
    # every gradient entry sums contributions of the n = rows x (P + T) positions of the batch (each
    # position reaches every weight through attention); rounding errors of n terms add up like a random
    # walk, eps32 * sqrt(n) times the magnitude, and 4x that is the bound (n = 72: 34 eps32 * max|x|;
    # measured with torch 2.13: gradients of all three paths, the plain full rows too, within 13 eps32
    # * max|g|, the log-probs within 1 eps32 * max|lp|). The largest gradients (~18 for the tiny Qwen's
    # tied embedding) carry float32 errors above any fixed 1e-5.
    exact, exact_grads = run(copy.deepcopy(model).double(), naive_pair_logprobs)
    bound = 4 * torch.finfo(torch.float32).eps * math.sqrt(batch.input_ids.numel())
    for fn in (naive_pair_logprobs, lambda m, bt: pair_logprobs(m, bt, shared_prompt=False), lambda m, bt: pair_logprobs(m, bt, shared_prompt=True)):
        lp, grads = run(model, fn)
        assert (lp - exact).abs().max() <= bound * exact.abs().max(), (lp, exact)
        for a, r in zip(grads, exact_grads):
            assert (a - r).abs().max() <= bound * r.abs().max()
    assert exact.shape == (6,) and (exact < 0).all()


def test_response_logprobs_unchanged_by_extra_left_padding():
    model = tiny_qwen()
    ex = examples()
    for shared in (True, False):
        alone = torch.stack([pair_logprobs(model, collate([e], 0), shared_prompt=shared) for e in ex])  # (3, 2): no padding at all
        together = pair_logprobs(model, collate(ex, 0), shared_prompt=shared)  # queries left-padded to 7, responses right-padded
        assert torch.allclose(torch.stack([together[:3], together[3:]], 1), alone, atol=1e-5)
        # 9 more pad columns on the left of every query
        wide = collate([PreferenceExample("w", [1] * 16, [2], [3])] + ex, 0)
        assert torch.allclose(pair_logprobs(model, wide, shared_prompt=shared).view(2, 4)[:, 1:].t(), alone, atol=1e-5)


def test_score_pairs_restores_order_and_matches_pair_logprobs():
    model = tiny_qwen()
    ex = examples()
    scores = score_preference_pairs(model, ex, pair_logprobs, pad_token_id=0, batch_size=2)  # length-sorted batches of 2
    direct = pair_logprobs(model, collate(ex, 0))
    assert torch.allclose(scores, torch.stack([direct[:3], direct[3:]], 1), atol=1e-5)
    assert model.training is False


def test_implicit_reward_metrics_hand_computed():
    # beta 0.5; rewards (chosen, rejected): (0.5*(−10+11), 0.5*(−12+11)) = (0.5, −0.5) right;
    # (0.5*(−13+12), 0.5*(−9+10)) = (−0.5, 0.5) wrong; (0, 0) a tie -> wrong. accuracy 1/3.
    policy = torch.tensor([[-10.0, -12.0], [-13.0, -9.0], [-5.0, -6.0]])
    ref = torch.tensor([[-11.0, -11.0], [-12.0, -10.0], [-5.0, -6.0]])
    m = implicit_reward_metrics(policy, ref, beta=0.5, confidences=[9, 1, 9])
    assert m["accuracy"] == pytest.approx(1 / 3) and m["n"] == 3 and m["ties"] == 1
    assert m["reward_margin"] == pytest.approx((1.0 - 1.0 + 0.0) / 3)
    assert m["chosen_reward"] == pytest.approx(0.0)
    assert m["accuracy_by_confidence"] == {"1": {"accuracy": 0.0, "n": 1}, "9": {"accuracy": 0.5, "n": 2}}


def test_nplus_26_implicit_reward_accuracy_of_the_reference_itself_is_zero_all_ties():
    model = tiny_qwen()
    ex = examples()
    ref = reference_logprobs(model, ex, pad_token_id=0)
    out = implicit_reward_accuracy(model, ex, ref, beta=0.1, pad_token_id=0)
    assert out["ties"] == 3 and out["accuracy"] == 0.0
    with pytest.raises(ValueError, match="expected \\(3, 2\\)"):
        implicit_reward_accuracy(model, ex, ref[:2], beta=0.1, pad_token_id=0)


def test_lora_reference_is_the_base_with_adapters_disabled():
    model = apply_lora(tiny_qwen(), r=4, alpha=8)
    ex = examples()
    base = score_preference_pairs(model, ex, pair_logprobs, pad_token_id=0)
    for n, p in model.named_parameters():  # move the adapters away from their zero init
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    moved = score_preference_pairs(model, ex, pair_logprobs, pad_token_id=0)
    assert not torch.allclose(moved, base, atol=1e-3)
    assert torch.allclose(reference_logprobs(model, ex, pad_token_id=0), base, atol=1e-6)


def dpo_cfg(sft_dir, out, **kw):
    base = DPOConfig(
        sft_path=sft_dir,
        tokenizer=str(QWEN_TOKENIZER),
        dtype="float32",
        data=DPODataArgs(comparisons=str(COMPARISONS), max_query_length=96, max_response_length=40, limit=40, valid_limit=6),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0),
        run=RunArgs(output_dir=str(out), save_every=1, max_steps=2, progress=False, eval_every=0, num_threads=1),
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        eval_batch_size=4,
        num_sample_posts=1,
        sample_max_new_tokens=3,
    )
    return dataclasses.replace(base, **kw)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def sft_dir(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def finished_run(sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = dpo_cfg(sft_dir, out)
    final = dpo.train(cfg)
    return cfg, out, final


def test_train_writes_run_folder_and_first_loss_is_log2(finished_run, qwen_tokenizer):
    cfg, out, final = finished_run
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "loss/dpo" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # Step 1 is taken by the SFT weights themselves: policy == reference, so the loss is log 2
    # (also with label smoothing 0.1) and every implicit reward is 0 up to float rounding (the cached
    # reference was computed in other batches, with other padding, than the training forward).
    assert steps[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/margin", "rewards/chosen", "rewards/rejected"):
        assert abs(steps[0][key]) < 1e-5
    assert steps[1]["loss/dpo"] != pytest.approx(math.log(2), abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "lr", "grad_norm", "perf/pairs_per_s"):
        assert key in steps[0]
    final_rec = records[-1]
    n_valid = len(load_dpo_data(cfg.data, qwen_tokenizer)[1])
    assert final_rec["valid/n"] == n_valid and 0 < n_valid <= 6 and 0.0 <= final_rec["valid/implicit_reward_accuracy"] <= 1.0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["held_out"]["n"] == n_valid and ev["held_out"]["accuracy"] == final_rec["valid/implicit_reward_accuracy"]
    samples = read_jsonl(out / "samples.jsonl")
    assert [(s["step"], s["model"]) for s in samples] == [(0, "sft"), (2, "dpo")]
    assert samples[0]["id"] == samples[1]["id"] and samples[0]["chosen"]
    assert json.loads((out / "config.json").read_text())["beta"] == 0.1
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert reloaded.config.vocab_size == 151665


def test_parameters_change_after_a_step(finished_run, sft_dir):
    _, _, final = finished_run
    before = dict(AutoModelForCausalLM.from_pretrained(sft_dir).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(final).named_parameters())
    changed = [n for n, p in after.items() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert len(changed) == len(after)  # every tensor moved, norms included


def test_cached_reference_logprobs_equal_freshly_computed(finished_run, sft_dir, qwen_tokenizer):
    tok = qwen_tokenizer
    cfg, out, _ = finished_run
    cache = torch.load(out / dpo.REFERENCE_CACHE, weights_only=True)
    train_ex, valid_ex, _ = load_dpo_data(cfg.data, tok)
    sft = load_causal_lm(sft_dir, tokenizer=tok)
    fresh_valid = score_preference_pairs(sft, valid_ex, pair_logprobs, pad_token_id=tok.pad_token_id, batch_size=3, shared_prompt=False)
    assert torch.allclose(cache["valid"], fresh_valid, atol=1e-4)
    used = (~cache["train"].isnan().any(1)).nonzero().squeeze(1).tolist()
    assert len(used) == 2 * 4  # 2 steps of 4 pairs; the pairs this run never sees are not scored
    fresh_train = score_preference_pairs(sft, [train_ex[i] for i in used], pair_logprobs, pad_token_id=tok.pad_token_id, batch_size=3, shared_prompt=False)
    assert torch.allclose(cache["train"][used], fresh_train, atol=1e-4)


def test_reference_cache_is_recomputed_when_the_sft_weights_at_its_path_change(tmp_path, qwen_tokenizer, monkeypatch):
    # A run folder holds the reference log-probs of the SFT weights; the SFT model is then retrained
    # at the same path (same file names and sizes, other values). The cache must not be reused for
    # the new weights, and must be reused while the weights stay the same.
    from types import SimpleNamespace

    sft = tmp_path / "sft"
    make_tiny_qwen2(seed=0).save_pretrained(sft)
    qwen_tokenizer.save_pretrained(sft)
    run = SimpleNamespace(path=tmp_path / "run", is_main=True)
    run.path.mkdir()
    cfg = dpo_cfg(str(sft), run.path)
    ex = examples()
    calls = []
    real = dpo.reference_logprobs
    monkeypatch.setattr(dpo, "reference_logprobs", lambda model, exs, **k: calls.append(len(exs)) or real(model, exs, **k))

    def cached(model):
        return dpo.cached_reference_logprobs(run, cfg, model, ex, [0, 2], ex[1:], pad_token_id=EOS, accelerator=None)

    old = load_causal_lm(str(sft), tokenizer=qwen_tokenizer)
    train0, valid0 = cached(old)
    assert calls == [2, 2] and (run.path / dpo.REFERENCE_CACHE).exists()  # 2 used training pairs, 2 held-out
    train0_again, valid0_again = cached(old)
    assert calls == [2, 2] and torch.equal(valid0_again, valid0)  # same weights: read from the cache

    size = (sft / "model.safetensors").stat().st_size
    make_tiny_qwen2(seed=1).save_pretrained(sft)  # retrained at the same path
    assert (sft / "model.safetensors").stat().st_size == size
    new = load_causal_lm(str(sft), tokenizer=qwen_tokenizer)
    train1, valid1 = cached(new)
    assert calls == [2, 2, 2, 2]  # recomputed, with the new weights
    torch.testing.assert_close(valid1, score_preference_pairs(new, ex[1:], pair_logprobs, pad_token_id=EOS), atol=1e-5, rtol=0)
    assert (valid1 - valid0).abs().min() > 1e-3
    cached(new)
    assert calls == [2, 2, 2, 2]  # and the new cache is read back while they stay


def test_checkpoint_fingerprint_follows_contents(tmp_path):
    # a folder: any file's content; a single (.gguf) file: its content; a hub id: id + cached commit
    from tldr_rlhf.checkpoints import checkpoint_fingerprint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "config.json").write_text("{}")
    a = checkpoint_fingerprint(str(folder))
    assert checkpoint_fingerprint(str(folder)) == a
    (folder / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")  # same size, one byte changed
    assert checkpoint_fingerprint(str(folder)) != a
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF1")
    b = checkpoint_fingerprint(str(gguf))
    gguf.write_bytes(b"GGUF2")
    assert checkpoint_fingerprint(str(gguf)) != b
    hub = checkpoint_fingerprint("nobody-here/not-a-cached-model")
    assert hub == checkpoint_fingerprint("nobody-here/not-a-cached-model") != checkpoint_fingerprint("nobody-here/other-model")


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(finished_run, monkeypatch):
    cfg, out, final = finished_run
    resumed_out = out.parent / "resumed"
    shutil.copytree(out, resumed_out)
    shutil.rmtree(resumed_out / "final")
    assert (resumed_out / "checkpoints" / "step-1" / "state.pt").exists()
    calls = []
    monkeypatch.setattr(dpo, "reference_logprobs", lambda *a, **k: calls.append(1))  # the cache must be read, not recomputed
    dpo.train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(resumed_out))))
    assert calls == []
    a = AutoModelForCausalLM.from_pretrained(final).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed_out / "final").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["step"] for r in read_jsonl(resumed_out / "metrics.jsonl") if "loss/dpo" in r] == [1, 2]


def test_bad_settings_raise_before_loading_anything(sft_dir, tmp_path):
    with pytest.raises(DataError, match="--sft-path"):
        dpo.train(dpo_cfg("", tmp_path / "x"))
    with pytest.raises(DataError, match="label_smoothing"):
        dpo.train(dpo_cfg(sft_dir, tmp_path / "x", loss_type="ipo"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"info": {"id": "p"}, "summaries": []}\n')
    with pytest.raises(DataError, match=r"bad.json:1.*info.subreddit"):
        dpo.train(dpo_cfg(sft_dir, tmp_path / "x", data=DPODataArgs(comparisons=str(bad))))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # ~20 s, mostly torchrun start-up; run with -m slow
def test_two_process_data_parallel_matches_one_process(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): micro-batch 1 x accumulation 2 each gives the same
    losses, held-out accuracy and weights as 1 process with accumulation 4 (the shared-prompt pair
    forward is one DDP call; reference log-probs are scored in shares and gathered)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from dist_dpo_script import make_config

    script = Path(__file__).with_name("dist_dpo_script.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), str(tiny_model_dir), str(COMPARISONS), str(tmp_path / "world2"), "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dpo.train(make_config(str(tiny_model_dir), str(COMPARISONS), str(tmp_path / "world1"), 4))  # in this process
    runs = {w: read_jsonl(tmp_path / f"world{w}" / "metrics.jsonl") for w in (1, 2)}
    one, two = ({r["step"]: r for r in recs if "loss/dpo" in r} for recs in (runs[1], runs[2]))
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        for key in ("loss/dpo", "rewards/margin", "logps/chosen"):
            assert two[step][key] == pytest.approx(one[step][key], abs=1e-4)
    assert runs[2][-1]["dist/params_in_sync"] is True
    assert runs[2][-1]["valid/implicit_reward_accuracy"] == runs[1][-1]["valid/implicit_reward_accuracy"]
    w1, w2 = (load_file(tmp_path / f"world{w}" / "final" / "model.safetensors") for w in (1, 2))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)


def test_cli_dpo_presets_and_flags():
    from tldr_rlhf.cli import parse
    from tldr_rlhf.presets import DPO_PRESETS

    _, cfg = parse(["dpo", "--sft-path", "runs/sft/final"])  # the seed preset is the default
    assert (cfg.beta, cfg.label_smoothing, cfg.optim.lr, cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.optim.warmup_ratio) == (0.1, 0.1, 5e-5, 8, 16, 0.03)
    assert cfg.sft_path == "runs/sft/final" and cfg.global_batch_size() == 128
    _, cfg = parse(["dpo", "--preset", "nplus", "--sft-path", "x"])
    assert (cfg.beta, cfg.optim.lr, cfg.label_smoothing) == (0.05, 3e-6, 0.0)
    _, cfg = parse(["dpo", "--preset", "cpu-smol", "--loss-type", "ipo", "--label-smoothing", "0", "--no-shared-prompt", "--run.num-threads", "1"])
    assert cfg.loss_type == "ipo" and cfg.shared_prompt is False and cfg.run.num_threads == 1
    assert cfg.sft_path == DPO_PRESETS["cpu-smol"].sft_path == "runs/sft-cpu-smol/final"
