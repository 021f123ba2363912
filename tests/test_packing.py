"""Padding-free batches (data/packing.py): the packed layout by hand, log-probs, the SFT loss and its
gradients equal to the padded path, the flag."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, make_tiny_qwen2

from tldr_rlhf.data.batching import QueryResponseBatch, collate_query_response
from tldr_rlhf.data.packing import pack_query_response, packed_response_logprobs
from tldr_rlhf.losses import sft_loss
from tldr_rlhf.train.sft import target_logprobs

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _batch() -> QueryResponseBatch:
    # queries of 3, 1, 2 tokens and responses of 3, 2, 1: padded to 3 + 3 columns
    return collate_query_response([[10, 11, 12], [13], [14, 15]], [[20, 21, EOS], [22, EOS], [23]], EOS)


def test_packed_layout_by_hand():
    p = pack_query_response(_batch())
    assert p.input_ids.tolist() == [[10, 11, 12, 20, 21, EOS, 13, 22, EOS, 14, 15, 23]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]]
    # response token (row, col) is predicted at the packed position before it
    assert p.rows.tolist() == [0, 0, 0, 1, 1, 2] and p.cols.tolist() == [0, 1, 2, 0, 1, 0]
    assert p.predict_at.tolist() == [2, 3, 4, 6, 7, 10]
    assert p.targets.tolist() == [20, 21, EOS, 22, EOS, 23]
    assert p.shape == (3, 3)


def test_a_row_without_query_tokens_is_refused():
    b = _batch()
    mask = b.attention_mask.clone()
    mask[1, :3] = False  # row 1 loses its only query token
    with pytest.raises(ValueError, match="no query token"):
        pack_query_response(QueryResponseBatch(b.input_ids, mask, b.response_mask, b.query_width))


def test_packed_logprobs_loss_and_gradients_equal_the_padded_path():
    """Rows of different lengths: if attention leaked across rows, or positions did not restart,
    rows 1 and 2 would differ from their padded values."""
    batch = _batch()
    grads, values = {}, {}
    for padding_free in (False, True):
        model = make_tiny_qwen2()
        lp, mask = target_logprobs(model, batch, False, padding_free=padding_free)
        loss, _ = sft_loss(lp, mask)
        loss.backward()
        values[padding_free] = (lp.detach()[mask], loss.item())
        grads[padding_free] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(values[True][0], values[False][0], atol=1e-5, rtol=0)
    assert values[True][1] == pytest.approx(values[False][1], abs=1e-5)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_logprobs_are_zero_at_padding_and_honor_temperature():
    model = make_tiny_qwen2()
    batch = _batch()
    with torch.no_grad():
        lp = packed_response_logprobs(model, batch)
        hot = packed_response_logprobs(model, batch, temperature=1.7)
    assert (lp[~batch.response_mask] == 0).all()
    assert not torch.allclose(lp[batch.response_mask], hot[batch.response_mask])


def test_padding_free_flag():
    from tldr_rlhf.cli import parse

    assert parse(["sft", "--padding-free"])[1].padding_free is True
    assert parse(["sft", "--no-padding-free"])[1].padding_free is False


def test_sft_padding_free_runs_the_packed_forward(monkeypatch):
    from tldr_rlhf.train import sft

    calls = []
    monkeypatch.setattr(sft, "packed_response_logprobs", lambda model, batch: calls.append(batch) or torch.zeros(batch.response_mask.shape))
    batch = _batch()
    sft.target_logprobs(make_tiny_qwen2(), batch, False, padding_free=True)
    assert calls == [batch]
    sft.target_logprobs(make_tiny_qwen2(), batch, True, padding_free=True)  # loss on the query: padded rows
    assert len(calls) == 1


def test_packed_forward_runs_causal_attention_per_row_and_restores_sdpa(monkeypatch):
    """On SDPA the packed forward runs ``segment_sdpa`` (one causal SDPA per row, not an S x S masked
    one) in every layer, and the model is back on plain SDPA afterwards."""
    from tldr_rlhf.data import packing

    model = make_tiny_qwen2()
    assert model.config._attn_implementation == "sdpa"
    calls = []
    real = packing.segment_sdpa

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape)
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(packing, "segment_sdpa", spy)
    monkeypatch.setattr(packing, "SEGMENT_ATTENTION", "tldr_rlhf_segment_sdpa_spy")
    with torch.no_grad():
        packed_response_logprobs(model, _batch())
    assert len(calls) == model.config.num_hidden_layers and calls[0][2] == 12  # 12 packed tokens, one row
    assert model.config._attn_implementation == "sdpa"


def test_activation_checkpointing_keeps_the_padded_path(monkeypatch):
    """Checkpointing recomputes each block in backward, outside the packed forward's attention: the
    rows stay padded there."""
    from tldr_rlhf.modeling import enable_gradient_checkpointing
    from tldr_rlhf.train import sft

    monkeypatch.setattr(sft, "packed_response_logprobs", lambda *a, **k: pytest.fail("packed under checkpointing"))
    model = make_tiny_qwen2()
    enable_gradient_checkpointing(model)
    model.train()
    lp, mask = sft.target_logprobs(model, _batch(), False, padding_free=True)
    assert lp.shape == mask.shape == (3, 3)


@pytest.mark.parametrize("padding_free, packed_calls", [(True, 2), (False, 0)])
def test_sft_training_steps_take_the_packed_forward_by_default(tiny_model_dir, tmp_path, monkeypatch, padding_free, packed_calls):
    """``sft.train``'s optimizer steps (``accumulate_gradients``) reach the packed forward once per
    micro-batch with the default config (2 steps x 1 micro-batch) and never under --no-padding-free."""
    from conftest import POSTS

    from tldr_rlhf.config import ModelArgs, OptimArgs, RunArgs, SFTConfig, TldrDataArgs
    from tldr_rlhf.train import sft

    calls = []
    real = sft.packed_response_logprobs
    monkeypatch.setattr(sft, "packed_response_logprobs", lambda model, batch: calls.append(batch) or real(model, batch))
    cfg = SFTConfig(
        model=ModelArgs(path=str(tiny_model_dir)),
        data=TldrDataArgs(train=str(POSTS), max_query_length=96, limit=8, valid_limit=2, valid_fraction=0.01),
        optim=OptimArgs(lr=1e-3, warmup_steps=1, decay_steps=0),
        run=RunArgs(output_dir=str(tmp_path / "run"), progress=False, eval_every=0, save_every=0, max_steps=2, peak_tflops=1.7),
        micro_batch_size=2, gradient_accumulation_steps=1, num_sample_posts=0, padding_free=padding_free,
    )
    assert SFTConfig().padding_free
    sft.train(cfg)
    assert len(calls) == packed_calls
