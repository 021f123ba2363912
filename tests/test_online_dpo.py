"""Online DPO (train/online_dpo.py, Guo et al. 2024): pair labelling and the loss by hand, and the stage
end to end on tiny models built from a config (real tokenizer, real posts): labels follow the reward,
the first step's loss is log 2, parameters change, and a resumed run reproduces the uninterrupted one."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tldr_rlhf import cli, rollout
from tldr_rlhf.config import OnlineDPOConfig, OptimArgs, RunArgs, TldrDataArgs
from tldr_rlhf.errors import RunDirError
from tldr_rlhf.presets import ONLINE_DPO_PRESETS
from tldr_rlhf.train import online_dpo
from tldr_rlhf.train.online_dpo import label_pairs, pair_loss

from rl_fixtures import EOS, POSTS, crashed_after_first_update, one_thread


def test_label_pairs_by_hand():
    # pairs (0.3, 1.7): second wins; (-1.0, -1.0): tied (first listed as chosen); (2.5, 0.4): first wins
    chosen, rejected, tied = label_pairs(torch.tensor([0.3, 1.7, -1.0, -1.0, 2.5, 0.4]))
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 3, 5] and tied.tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"\(2N,\)"):
        label_pairs(torch.zeros(3))


def test_pair_loss_is_the_dpo_formula_on_hand_values():
    # rows: chosen of pairs 0, 1, 2 then rejected of pairs 0, 1, 2; pair 1 is tied (left out)
    pi = torch.tensor([-3.0, -9.0, -2.0, -5.5, -9.0, -1.0])
    ref = torch.tensor([-4.0, -7.0, -1.5, -4.5, -7.0, -1.2])
    keep = torch.tensor([True, False, True])
    # pair 0: h = (-3 + 4) - (-5.5 + 4.5) = 2.0 -> -log sigmoid(0.1 * 2.0) = log(1 + e^-0.2) = 0.598139
    # pair 2: h = (-2 + 1.5) - (-1 + 1.2) = -0.7 -> -log sigmoid(-0.07) = log(1 + e^0.07) = 0.728760
    loss, m = pair_loss(pi, ref, keep, num_pairs=2, beta=0.1)
    assert loss.item() == pytest.approx((0.5981389 + 0.7287596) / 2, abs=1e-6)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)  # implicit rewards: pair 0 right, pair 2 wrong
    # the same micro-batch inside a minibatch of 4 kept pairs: its share is 2 / 4 of the mean
    loss4, _ = pair_loss(pi, ref, keep, num_pairs=4, beta=0.1)
    assert loss4.item() == pytest.approx(0.3317246, abs=1e-6)
    # conservative DPO on pair 0 alone: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.618139
    loss_ls, _ = pair_loss(pi[[0, 3]], ref[[0, 3]], torch.tensor([True]), num_pairs=1, beta=0.1, label_smoothing=0.1)
    assert loss_ls.item() == pytest.approx(0.6181389, abs=1e-6)
    # every pair tied: a zero loss that still backpropagates (the micro-batch's no_sync pass runs)
    w = torch.tensor([-1.0, -2.0], requires_grad=True)
    zero, m0 = pair_loss(w, torch.zeros(2), torch.tensor([False]), num_pairs=0, beta=0.1)
    zero.backward()
    assert zero.item() == 0.0 and m0 == {} and w.grad.tolist() == [0.0, 0.0]


@pytest.fixture
def ends_with_eos(monkeypatch):
    """A tiny random policy almost never samples EOS, so every response would get the no-EOS score
    and every pair would tie: responses are cut to 2-4 of their sampled tokens and end with EOS."""
    real = rollout.generate

    def generate(*args, **kwargs):
        return [r[: 2 + i % 3] + [EOS] for i, r in enumerate(real(*args, **kwargs))]

    monkeypatch.setattr(rollout, "generate", generate)


def small_cfg(sft, out, **kw) -> OnlineDPOConfig:
    base = dict(
        sft_path=sft, reward="length,reward_fns:chars:0.01", dtype="float32",
        data=TldrDataArgs(train=str(POSTS), limit=16, max_query_length=64, valid_fraction=0.1),
        optim=OptimArgs(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=0, max_grad_norm=1.0),
        run=RunArgs(output_dir=str(out), save_every=1, eval_every=1, progress=False, num_threads=1),
        total_episodes=16, rollout_prompts=4, mini_batch_size=4, micro_batch_size=2, forward_batch_size=8,
        response_length=6, num_sample_posts=8, beta=0.1,
    )
    base.update(kw)
    return OnlineDPOConfig(**base)


def _records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_online_dpo_run_labels_follow_the_reward_and_resume_is_exact(ckpts, ends_with_eos, tmp_path):
    out = tmp_path / "run"
    with one_thread():
        final = online_dpo.train(small_cfg(ckpts[0], out))
    ups = [r for r in _records(out) if "objective/scores" in r]
    assert [u["step"] for u in ups] == [1, 2]
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    for u in ups:
        rows = [s for s in samples if s["step"] == u["step"]]
        assert len(rows) == 8 and all(s["has_eos"] for s in rows)
        pairs = [(rows[2 * i], rows[2 * i + 1]) for i in range(4)]
        assert all(a["id"] == b["id"] for a, b in pairs)  # a pair is one prompt's two responses
        for a, b in pairs:  # the reward: words + 0.01 x characters of the response
            assert a["score"] == pytest.approx(len(a["response"].split()) + 0.01 * len(a["response"]), abs=1e-5)
        # labels follow the reward: the higher-scored response is chosen, ties are left out
        untied = [(a, b) for a, b in pairs if a["score"] != b["score"]]
        assert u["online_dpo/tied_pairs"] == pytest.approx(1 - len(untied) / 4)
        assert u["online_dpo/score_margin"] == pytest.approx(sum(abs(a["score"] - b["score"]) for a, b in untied) / len(untied), abs=1e-5)
        chosen = [a if a["score"] >= b["score"] else b for a, b in pairs]
        assert u["online_dpo/chosen_length"] == pytest.approx(sum(c["length"] for c in chosen) / 4)
    first = ups[0]
    # before the first optimizer step the policy is the reference: every kept pair's loss is log 2
    assert first["online_dpo/first_minibatch_ratio_max_abs_dev"] == 0.0
    assert first["loss/policy"] == pytest.approx(math.log(2), abs=1e-6) and first["online_dpo/reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # update 2 samples from the moved policy (its one minibatch is on-policy: ratio 1) and the loss left log 2
    assert ups[1]["objective/kl"] != 0.0 and ups[1]["online_dpo/ratio_max_abs_dev"] == 0.0
    assert abs(ups[1]["loss/policy"] - math.log(2)) > 1e-4 and ups[1]["online_dpo/reward_margin"] != 0.0
    before, after = load_file(f"{ckpts[0]}/model.safetensors"), load_file(f"{final}/model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2

    # a crash after update 1: keep only checkpoints/step-1 in a copy of the run folder, rerun
    crashed = crashed_after_first_update(out, tmp_path / "crashed")
    assert (crashed / "checkpoints" / "step-1" / "state.pt").exists()
    with one_thread():
        resumed = online_dpo.train(small_cfg(ckpts[0], crashed))
    a, b = load_file(f"{final}/model.safetensors"), load_file(f"{resumed}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _records(crashed)] == [r["step"] for r in _records(out)]
    with pytest.raises(RunDirError):
        online_dpo.train(small_cfg(ckpts[0], crashed))  # finished run, no --run.overwrite


def test_online_dpo_with_the_reward_model_path(ckpts, ends_with_eos, tmp_path):
    out = tmp_path / "rm"
    with one_thread():
        online_dpo.train(small_cfg(ckpts[0], out, reward="", rm_path=ckpts[1], total_episodes=8, micro_batch_size=4))
    (u,) = [r for r in _records(out) if "objective/scores" in r]
    assert u["online_dpo/tied_pairs"] == 0.0  # a random reward model's float scores do not tie
    assert u["loss/policy"] == pytest.approx(math.log(2), abs=1e-6)


def test_online_dpo_command_presets_and_one_line_errors(ckpts, tmp_path, capsys):
    assert list(ONLINE_DPO_PRESETS) == ["default", "cpu-smol", "cpu-smol-gold"]
    assert ONLINE_DPO_PRESETS["cpu-smol-gold"].reward == "rouge-l" and not ONLINE_DPO_PRESETS["cpu-smol-gold"].rm_path
    assert OnlineDPOConfig().group_size == 2 and OnlineDPOConfig(total_episodes=256, rollout_prompts=64).num_updates() == 2
    capsys.readouterr()
    out = tmp_path / "run"
    base = ["online-dpo", "--sft-path", ckpts[0], "--data.train", str(POSTS), "--run.output-dir", str(out)]
    assert cli.main([*base, "--reward", "rouge-l", "--rollout-prompts", "6", "--mini-batch-size", "4", "--total-episodes", "24"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tldr-rlhf: error: batch sizes: per-process pairs of an update (6) must split exactly into the per-process minibatch (4)") and err.count("\n") == 1
    assert cli.main([*base, "--reward", "reward_fns:nope"]) == 2
    assert capsys.readouterr().err == "tldr-rlhf: error: --reward reward_fns:nope: module 'reward_fns' has no callable 'nope'\n"
    assert cli.main([*base, "--beta", "0"]) == 2
    assert capsys.readouterr().err == "tldr-rlhf: error: --beta 0.0: must be > 0\n"
    assert not out.exists()
