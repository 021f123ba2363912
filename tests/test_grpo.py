"""GRPO and RLOO stages end to end on tiny models built from a config (real tokenizer, real posts)."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tldr_rlhf.config import GRPOConfig, OptimArgs, RLOOConfig, RunArgs, TldrDataArgs
from tldr_rlhf.presets import GRPO_PRESETS, RLOO_PRESETS
from tldr_rlhf.train import grpo, rloo

from rl_fixtures import POSTS


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def common(sft, rm, out):
    return dict(
        sft_path=sft, rm_path=rm, dtype="float32",
        data=TldrDataArgs(train=POSTS, limit=8, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), save_every=0, eval_every=1, progress=False, num_threads=1),
        rollout_prompts=2, group_size=4, micro_batch_size=2, forward_batch_size=8, response_length=6, num_sample_posts=4,
    )


def _updates(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "objective/scores" in l]


@pytest.fixture(scope="module")
def grpo_run(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    cfg = GRPOConfig(**common(*ckpts, out), total_episodes=8, mini_batch_size=4, update_per_rollout=2)
    return out, grpo.train(cfg)


def test_nplus_24_grpo_run_ratio_one_first_minibatch_and_weights_change(grpo_run, ckpts):
    out, final = grpo_run
    ups = _updates(out)
    assert [u["step"] for u in ups] == [1]  # one rollout: 2 passes x 2 minibatches = 4 optimizer steps
    first = ups[0]
    # before the first optimizer step the training pass reproduces the rollout log-probs exactly
    assert first["grpo/first_minibatch_ratio_max_abs_dev"] == 0.0 and first["grpo/ratio_max_abs_dev"] > 0.0
    for key in ("grpo/clipfrac", "grpo/dual_clipfrac", "grpo/kl", "grpo/group_score_std", "objective/eos_rate", "objective/entropy", "loss/policy"):
        assert key in first, key
    before, after = load_file(f"{ckpts[0]}/model.safetensors"), load_file(f"{final}/model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    # samples: the first 4 rows are one prompt's group of G = 4 responses
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len({s["id"] for s in samples if s["step"] == 1}) == 1


def test_nplus_25_grpo_with_rejection_sampling_keeps_high_scores(ckpts, tmp_path):
    # beta tiny: the kept G = 2 of 6 candidates are each prompt's top 2, so their mean score is at
    # least the candidates' mean
    cfg = GRPOConfig(
        **{**common(*ckpts, tmp_path / "rs"), "group_size": 2}, total_episodes=4, mini_batch_size=4, update_per_rollout=1,
        rejection_sampling=True, rs_candidates=6, rs_temperature=1.0, rs_beta=1e-4, global_normalize=True,
    )
    grpo.train(cfg)
    (u,) = _updates(tmp_path / "rs")
    assert u["rs/kept_score_mean"] >= u["rs/candidate_score_mean"]
    assert u["grpo/first_minibatch_ratio_max_abs_dev"] == 0.0


def test_rloo_run(ckpts, tmp_path):
    cfg = RLOOConfig(**common(*ckpts, tmp_path / "rloo"), total_episodes=8, mini_batch_size=8, update_per_rollout=1)
    final = rloo.train(cfg)
    (u,) = _updates(tmp_path / "rloo")
    assert u["rloo/first_minibatch_ratio_max_abs_dev"] == 0.0 and u["rloo/clipfrac"] == 0.0
    assert "objective/rlhf_reward" in u and "rloo/baseline_mean" in u
    before, after = load_file(f"{ckpts[0]}/model.safetensors"), load_file(f"{final}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("shared", [True, False])
def test_group_runs_with_and_without_the_shared_prompt_reproduce_the_rollout_logprobs(ckpts, tmp_path, shared, monkeypatch):
    # 2 prompts x G = 4, one minibatch of the 8 shuffled rows in micro-batches of 2; with the shared
    # prompt the minibatch is put in group order, so every training micro-batch holds one query (it
    # runs once), the rollout's passes run each query once too (generation / scoring time split
    # logged), and the training pass still reproduces the rollout's log-probs to the last bit
    from tldr_rlhf.lm_head import grouped_response_logits, query_groups
    from tldr_rlhf.train import group_rl

    queries_per_training_pass = []

    def spy(model, batch, *, shared_prompt=True):
        if torch.is_grad_enabled():
            queries_per_training_pass.append(len(query_groups(batch)[0]))
        return grouped_response_logits(model, batch, shared_prompt=shared_prompt)

    monkeypatch.setattr(group_rl, "grouped_response_logits", spy)
    cfg = RLOOConfig(**common(*ckpts, tmp_path / "r"), total_episodes=8, mini_batch_size=8, update_per_rollout=1, shared_prompt=shared)
    rloo.train(cfg)
    (u,) = _updates(tmp_path / "r")
    assert u["rloo/first_minibatch_ratio_max_abs_dev"] == 0.0
    assert ("perf/generation_time_s" in u and "perf/scoring_time_s" in u) is shared
    assert len(queries_per_training_pass) == 4 and (set(queries_per_training_pass) == {1} or not shared)


@pytest.mark.parametrize("value", [1.7, 2.3456789])
@pytest.mark.parametrize("g", [4, 8])
def test_tied_groups_get_zero_advantage_and_count_as_zero_std(value, g):
    # 3 groups of g: tied at a value float32 cannot represent, tied at 0, and [1, 0, ..., 0].
    # The tied groups give exactly 0 advantage and are 2 of 3 zero-std groups; before, 8 x 1.7 gave
    # +0.119 per member here (+0.106 alone, where its float32 std was 1.3e-7 and it was not counted).
    scores = torch.tensor([value] * g + [0.0] * g + [1.0] + [0.0] * (g - 1))
    mask = torch.ones(3 * g, 2, dtype=torch.bool)
    for global_normalize in (False, True):
        cfg = GRPOConfig(group_size=g, global_normalize=global_normalize)
        adv, m = grpo.group_relative_advantages(SimpleNamespace(scores=scores, mask=mask), cfg)
        assert m["grpo/zero_std_groups"] == pytest.approx(2 / 3)
        if not global_normalize:
            assert torch.equal(adv[: 2 * g], torch.zeros(2 * g, 2))
    # group_score_std: only the third group's sqrt(1/g), averaged over 3 groups
    assert m["grpo/group_score_std"] == pytest.approx((1 / g) ** 0.5 / 3)
    # one tied group alone (float32 std of 8 x 1.7 is 1.3e-7 in this layout, 0 in the one above)
    adv, m = grpo.group_relative_advantages(SimpleNamespace(scores=torch.full((g,), value), mask=mask[:g]), GRPOConfig(group_size=g))
    assert torch.equal(adv, torch.zeros(g, 2))
    assert m["grpo/zero_std_groups"] == 1.0 and m["grpo/group_score_std"] == 0.0


def _lengths_mask(lengths, t):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def test_grpo_advantages_are_per_token_with_zeros_on_padding():
    # one group of 2, scores [1.7, -0.3]: mean 0.7, unbiased std sqrt(2) (deviations +-1):
    # A = +-1 / (sqrt(2) + 1e-6) = +-0.7071063; on every real token (lengths 3 and 1 of T = 4), 0 after
    r = SimpleNamespace(scores=torch.tensor([1.7, -0.3]), mask=_lengths_mask([3, 1], 4))
    adv, _ = grpo.group_relative_advantages(r, GRPOConfig(group_size=2))
    a = 1 / (2**0.5 + 1e-6)
    assert adv.shape == (2, 4) and adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([[a, a, a, 0.0], [-a, 0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_rloo_advantages_are_per_token_with_zeros_on_padding():
    # k = 2, scores [1.7, 0.45], k1 KL per token [0.1, 0.3 | pad 5.0] and [-0.2 | pads], kl_coef 0.5:
    # R = [1.7 - 0.5 * 0.4, 0.45 + 0.5 * 0.2] = [1.5, 0.55]; leave-one-out baselines [0.55, 1.5]:
    # A = [0.95, -0.95] on the real tokens (lengths 2 and 1 of T = 3), 0 on padding
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = lp - torch.tensor([[0.1, 0.3, 5.0], [-0.2, 5.0, 5.0]])
    r = SimpleNamespace(scores=torch.tensor([1.7, 0.45]), logprobs=lp, ref_logprobs=ref, mask=_lengths_mask([2, 1], 3))
    adv, m = rloo.leave_one_out_advantages(r, RLOOConfig(group_size=2, kl_coef=0.5))
    assert adv.shape == (2, 3)
    torch.testing.assert_close(adv, torch.tensor([[0.95, 0.95, 0.0], [-0.95, 0.0, 0.0]]), atol=1e-6, rtol=0)
    assert m["objective/rlhf_reward"] == pytest.approx(1.025, abs=1e-6)


def test_advantage_abs_mean_counts_each_sequence_once_whatever_its_length():
    # a sequence-level advantage broadcast over responses of 1..7 tokens reports exactly mean_b |A_b|
    # (the value logged when the loop carried (B,) advantages); per-token ones: the mean of row means
    from tldr_rlhf.advantages import broadcast_over_response
    from tldr_rlhf.train.group_rl import sequence_abs_mean

    seq = torch.tensor([1.7, -0.3, 0.9, -1.2, 2.3456789, -0.1, 0.7])
    mask = _lengths_mask([1, 2, 3, 4, 5, 6, 7], 7)
    assert sequence_abs_mean(broadcast_over_response(seq, mask), mask) == seq.abs().mean().item()
    adv = torch.tensor([[1.7, -0.3, 0.0], [0.9, 0.0, 0.0]])
    assert sequence_abs_mean(adv, _lengths_mask([2, 1], 3)) == pytest.approx((1.0 + 0.9) / 2, abs=1e-7)


def test_nplus_24_grpo_seed_preset_matches_the_table():
    c = GRPO_PRESETS["seed"]
    assert (c.rollout_prompts, c.group_size, c.mini_batch_size, c.micro_batch_size, c.update_per_rollout) == (16, 8, 64, 8, 4)
    assert (c.optim.lr, c.optim.warmup_ratio, c.clip_range, c.dual_clip, c.temperature, c.response_length) == (5e-5, 0.03, 0.2, 3.0, 0.7, 63)
    assert (c.kl_coef, c.kl_estimator, c.loss_aggregation, c.no_eos_penalty) == (0.05, "k3", "seq-mean-token-mean", -1.0)
    # 128 sequences per rollout / minibatch 64 = 2 optimizer steps per pass, 4 passes
    assert c.optimizer_steps() == c.num_updates() * 8
    with pytest.raises(ValueError, match="micro_batch_size"):
        GRPOConfig(mini_batch_size=64, micro_batch_size=7).local_mini_batch_size()
    assert RLOO_PRESETS["default"].group_size == 4


def test_cli_grpo_and_rloo_commands():
    from tldr_rlhf.cli import parse

    _, cfg = parse(["grpo", "--preset", "dr-grpo", "--sft-path", "s", "--rm-path", "r"])
    assert isinstance(cfg, GRPOConfig) and not cfg.scale_by_std and cfg.sft_path == "s"
    _, cfg = parse(["rloo", "--sft-path", "s", "--rm-path", "r", "--group-size", "2"])
    assert isinstance(cfg, RLOOConfig) and cfg.group_size == 2
