"""UltraFeedback, the second task: raw-form pairing and English filter, binarized forms and ties,
prompt formatting (chat template and plain) with exact strings, the split, and every stage's data
through ``tasks`` with ``data.task = ultrafeedback``."""

import json

import pytest

from tldr_rlhf.config import PreferenceDataArgs as DPODataArgs, PreferenceDataArgs as RMDataArgs, TldrDataArgs
from tldr_rlhf.data import ultrafeedback as uf
from tldr_rlhf.data.ultrafeedback import Completion, load_ultrafeedback, pair_completions
from tldr_rlhf.errors import DataError

from conftest import EOS, SHARED, SMOL_GGUF

UF = SHARED / "data" / "ultrafeedback"
BIN_TRAIN, BIN_EVAL, ARGILLA = UF / "binarized_train_1k.jsonl", UF / "binarized_eval_200.jsonl", UF / "argilla_mean_rating_1k.jsonl"


def raw_record(instruction, completions, source="evol_instruct"):
    """One record in the raw openbmb/UltraFeedback layout: 4 completions with per-aspect ratings."""
    return {
        "source": source,
        "instruction": instruction,
        "models": [m for m, _, _ in completions],
        "completions": [
            {
                "model": model,
                "response": response,
                "overall_score": score,
                "custom_system_prompt": "",
                "principle": "helpfulness",
                "fine-grained_score": None if score is None else score / 2,
                "annotations": {
                    "helpfulness": {"Rating": "4", "Rationale": "ok"},
                    "honesty": {"Rating": "5", "Rationale": "ok"},
                    "instruction_following": {"Rating": "4", "Rationale": "ok"},
                    "truthfulness": {"Rating": "5", "Rationale": "ok"},
                },
            }
            for model, response, score in completions
        ],
        "correct_answers": [],
        "incorrect_answers": [],
    }


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------
# Raw form: greedy min-gap pairing, leftovers for SFT, English filter


def test_greedy_min_gap_pairing_exact_pairs_and_leftovers():
    a, b, c, d = (Completion(t, s) for t, s in (("a", 9.0), ("b", 8.5), ("c", 8.0), ("d", 3.0)))
    # sorted 9, 8.5, 8, 3: 9 pairs with 3 (the first at least 2 lower); 8.5 and 8 find no partner
    pairs, left = pair_completions([c, a, d, b], 2.0)
    assert pairs == [(a, d)] and left == [b, c]
    # 7, 6, 5, 4: 7 pairs with 5 (first >= 2 lower, not the lowest), then 6 with 4; nothing left
    w, x, y, z = (Completion(t, s) for t, s in (("w", 7.0), ("x", 4.0), ("y", 6.0), ("z", 5.0)))
    pairs, left = pair_completions([w, x, y, z], 2.0)
    assert pairs == [(w, z), (y, x)] and left == []
    # a gap of exactly min_score_gap pairs; a gap of 1.9 does not
    assert pair_completions([Completion("p", 6.0), Completion("q", 4.0)], 2.0)[0] == [(Completion("p", 6.0), Completion("q", 4.0))]
    assert pair_completions([Completion("p", 6.0), Completion("q", 4.1)], 2.0) == ([], [Completion("p", 6.0), Completion("q", 4.1)])
    with pytest.raises(ValueError):
        pair_completions([], -1.0)


def test_is_english_identifies_other_languages_and_keeps_what_it_cannot_place():
    assert uf.is_english("How do I cook a t-bone steak in the oven?")
    assert uf.is_english("Translate 'bonjour' to English.")
    assert not uf.is_english("Wie koche ich ein Steak im Ofen?")
    assert not uf.is_english("¿Cómo cocino un filete en el horno?")
    assert not uf.is_english("如何在烤箱里烤牛排？")
    assert not uf.is_english("Mittag.") and not uf.is_english("Es ist 20 Uhr in Tokio.")
    # short answers no language explains well are kept (lingua's top guesses: Bokmal, Somali, German)
    assert uf.is_english("Tips: bed.") and uf.is_english("Thirteen.") and uf.is_english("Ten.")
    assert uf.is_english("2+2=?") and uf.is_english("42")  # no language at all: kept


def test_raw_form_pairs_english_only_and_leftovers_go_to_sft(tmp_path):
    f = write_jsonl(tmp_path / "raw.jsonl", [
        raw_record("Give me three tips for sleeping better.", [
            ("gpt-4", "Keep a regular schedule, avoid screens before bed, and keep the room cool.", 9.0),
            ("llama-2-7b-chat", "Sleep is important. Try to sleep more.", 8.5),
            ("alpaca-7b", "Para dormir mejor, apaga las luces y no bebas café por la noche.", 8.0),  # Spanish: dropped
            ("falcon-40b", "Tips: bed.", 3.0),
        ]),
        raw_record("Wie spät ist es in Tokio, wenn es in Berlin Mittag ist?", [  # German prompt: dropped
            ("gpt-4", "Es ist 20 Uhr in Tokio.", 9.0), ("alpaca-7b", "Mittag.", 2.0), ("x", "y", 1.0), ("z", "w", 1.0),
        ]),
        raw_record("Name a prime number larger than ten.", [
            ("gpt-4", "Eleven is a prime number larger than ten.", 10.0),
            ("wizardlm", "Thirteen.", 8.5),  # 1.5 below the best: no pair
            ("mpt-30b", "Twelve is prime.", 2.0),
            ("bard", "Ten.", None),  # no score: dropped
        ]),
    ])
    data = load_ultrafeedback(f, min_score_gap=2.0)
    assert data.drops.counts == {"response_not_english": 1, "prompt_not_english": 1, "completion_without_score": 1}
    got = [(p.prompt[:10], p.chosen, p.rejected, p.score_chosen, p.score_rejected) for p in data.pairs]
    assert got == [
        ("Give me th", "Keep a regular schedule, avoid screens before bed, and keep the room cool.", "Tips: bed.", 9.0, 3.0),
        ("Name a pri", "Eleven is a prime number larger than ten.", "Twelve is prime.", 10.0, 2.0),
    ]
    assert [(d.prompt[:10], d.response) for d in data.demonstrations] == [("Give me th", "Sleep is important. Try to sleep more."), ("Name a pri", "Thirteen.")]
    assert [i.reference for i in data.instructions] == ["Keep a regular schedule, avoid screens before bed, and keep the room cool.", "Eleven is a prime number larger than ten."]
    # without the filter the Spanish completion is paired and the German prompt kept
    all_langs = load_ultrafeedback(f, english_only=False)
    assert len(all_langs.instructions) == 3 and "prompt_not_english" not in all_langs.drops.counts


def test_raw_form_bad_records_name_file_line_and_field(tmp_path):
    rec = raw_record("Say hi.", [("m", "Hi!", 5.0)])
    del rec["completions"][0]["response"]
    f = write_jsonl(tmp_path / "bad.jsonl", [raw_record("Say hello.", [("m", "Hello!", 5.0)]), rec])
    with pytest.raises(DataError) as e:
        load_ultrafeedback(f, english_only=False)
    assert "bad.jsonl:2" in str(e.value) and "completions[0].response" in str(e.value)
    f2 = write_jsonl(tmp_path / "neither.jsonl", [{"question": "?"}])
    with pytest.raises(DataError, match="not an UltraFeedback record"):
        load_ultrafeedback(f2)


# ----------------------------------------------------------------------------------------------
# Binarized forms: ties dropped and counted


def test_binarized_ties_are_dropped_and_counted(tmp_path):
    f = write_jsonl(tmp_path / "bin.jsonl", [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "metadata": {"score_chosen": 8.0, "score_rejected": 4.0}},
        {"prompt": "p2", "chosen": "same", "rejected": "other", "metadata": {"score_chosen": 6.0, "score_rejected": 6.0}},
        # trl-lib hub layout: chat messages and top-level scores
        {"prompt": "p3", "chosen": [{"role": "user", "content": "p3"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "p3"}, {"role": "assistant", "content": "no"}], "score_chosen": 9, "score_rejected": 2},
        {"prompt": "p4", "chosen": "a", "rejected": "b", "metadata": {"rating_chosen": 4.5, "rating_rejected": 4.5}},  # Argilla tie
    ])
    data = load_ultrafeedback(f)
    assert [(p.prompt, p.chosen, p.rejected) for p in data.pairs] == [("p1", "good", "bad"), ("p3", "yes", "no")]
    assert data.pair_drops.counts == {"tie": 2} and data.drops.counts == {}
    assert [d.response for d in data.demonstrations] == ["good", "same", "yes", "a"]  # a tie's chosen is still a demonstration


def test_real_binarized_samples_match_their_readme():
    train, held = load_ultrafeedback(BIN_TRAIN), load_ultrafeedback(BIN_EVAL)
    assert train.pair_drops.counts["tie"] == 111 and held.pair_drops.counts["tie"] == 25  # README: 111 / 25 ties
    assert len(train.pairs) + train.drops.total + train.pair_drops.total == 1000 and len(held.pairs) == 175
    argilla = load_ultrafeedback(ARGILLA)
    assert "tie" not in argilla.pair_drops.counts and len(argilla.pairs) + argilla.drops.total + argilla.pair_drops.total == 1000
    assert all(p.score_chosen > p.score_rejected for p in train.pairs + argilla.pairs)


def test_binarized_missing_score_names_the_field(tmp_path):
    f = write_jsonl(tmp_path / "noscore.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "metadata": {"score_chosen": "high", "score_rejected": 1}}])
    with pytest.raises(DataError) as e:
        load_ultrafeedback(f)
    assert "noscore.jsonl:1" in str(e.value) and "metadata.score_chosen" in str(e.value)


def test_split_by_prompt_is_seeded_and_keeps_a_prompt_on_one_side():
    data = load_ultrafeedback(ARGILLA)
    train, held = uf.split_by_prompt(data, 0.2, seed=42)
    assert len({i.id for i in train.instructions}) == 800 and len({i.id for i in held.instructions}) == 200
    assert not {p.prompt_id for p in train.pairs} & {p.prompt_id for p in held.pairs}
    again, _ = uf.split_by_prompt(data, 0.2, seed=42)
    other, _ = uf.split_by_prompt(data, 0.2, seed=7)
    assert [p.prompt_id for p in again.pairs] == [p.prompt_id for p in train.pairs] != [p.prompt_id for p in other.pairs]


# ----------------------------------------------------------------------------------------------
# Formatting: exact strings


@pytest.fixture(scope="module")
def smol_tokenizer():
    from tldr_rlhf.modeling import load_tokenizer

    return load_tokenizer(str(SMOL_GGUF))


def test_chat_template_formatting_exact_string_and_ids(smol_tokenizer):
    text = uf.format_prompt(smol_tokenizer, "Hi?")
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    ids = uf.prompt_ids(smol_tokenizer, "Hi?")
    assert ids[:2] == [1, 9690] and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> system ... <|im_start|> assistant \n
    assert smol_tokenizer.decode(ids) == text
    assert uf.response_ids(smol_tokenizer, " Hello! \n") == smol_tokenizer.encode("Hello!", add_special_tokens=False) + [2]  # EOS = <|im_end|>


def test_plain_template_when_the_tokenizer_has_none(qwen_tokenizer, smol_tokenizer):
    assert not qwen_tokenizer.chat_template
    text = uf.format_prompt(qwen_tokenizer, "Name a color.")
    assert text == "### Instruction:\nName a color.\n\n### Response:\n"
    assert uf.format_prompt(smol_tokenizer, "Name a color.", "plain") == text
    assert uf.prompt_ids(qwen_tokenizer, "Name a color.") == qwen_tokenizer.encode(text, add_special_tokens=False)
    assert uf.response_ids(qwen_tokenizer, "Blue.") == [10331, 13, EOS]
    with pytest.raises(DataError, match="no chat template"):
        uf.format_prompt(qwen_tokenizer, "x", "chat")


def test_length_caps_drop_and_count(qwen_tokenizer):
    pairs = [uf.Pair("a", "Short?", "Yes.", "No.", 9, 1), uf.Pair("b", "Short?", "Yes " * 40, "No.", 9, 1), uf.Pair("c", "Long " * 50, "Yes.", "No.", 9, 1)]
    out, drops = uf.build_preference_examples(pairs, qwen_tokenizer, max_query_length=32, max_response_length=16)
    assert [e.post_id for e in out] == ["a"] and drops.counts == {"response_too_long": 1, "prompt_too_long": 1}
    assert out[0].chosen_ids == [9454, 13, EOS] and out[0].rejected_ids == [2753, 13, EOS]


# ----------------------------------------------------------------------------------------------
# Every stage's data through tasks


def test_stage_data_for_ultrafeedback_share_one_split(qwen_tokenizer):
    from tldr_rlhf import tasks
    from tldr_rlhf.tasks import dpo_pairs as load_dpo_data
    from tldr_rlhf.tasks import rl_prompts as load_prompts
    from tldr_rlhf.tasks import rm_pairs as load_rm_data

    caps = dict(task="ultrafeedback", max_query_length=256, max_response_length=256)
    sft_train, sft_valid, drops, _ = tasks.sft_examples(TldrDataArgs(train=str(ARGILLA), valid_limit=0, **caps), qwen_tokenizer)
    rm_train, rm_valid, report = load_rm_data(RMDataArgs(comparisons=str(ARGILLA), valid_limit=0, **caps), qwen_tokenizer)
    dpo_train, dpo_valid, _ = load_dpo_data(DPODataArgs(comparisons=str(ARGILLA), **caps), qwen_tokenizer)
    prompts, too_long = load_prompts(TldrDataArgs(train=str(ARGILLA), **caps), qwen_tokenizer)
    held = tasks.held_out_items(TldrDataArgs(train=str(ARGILLA), **caps))
    train_ids = {e.id for e in sft_train}
    assert [e.post_id for e in rm_train] == [e.post_id for e in dpo_train] and {e.post_id for e in rm_train} <= train_ids
    assert not train_ids & ({e.post_id for e in rm_valid} | {e.id for e in sft_valid}) and not train_ids & {i.id for i in held}
    assert {p.id for p in prompts} >= train_ids and all(len(p.query_ids) <= 256 for p in prompts)
    assert len(held) == 200 and report["train"]["dropped"]["response_too_long"] > 0 and drops.counts["response_too_long"] > 0
    e = rm_train[0]
    assert e.chosen_ids[-1] == EOS and qwen_tokenizer.decode(e.query_ids).startswith("### Instruction:\n")
    # the default TL;DR source becomes the UltraFeedback hub set for this task
    assert tasks.sources(RMDataArgs(task="ultrafeedback")) == ("trl-lib/ultrafeedback_binarized", "")


def test_hub_layouts_load_through_datasets_from_a_local_parquet_folder(tmp_path):
    """The hub path (``datasets.load_dataset``) on local parquet shards in the hub's layouts: raw
    openbmb rows, and trl-lib rows whose chosen / rejected are chat messages with top-level scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw" / "data"
    raw.mkdir(parents=True)
    record = raw_record("Name a prime number larger than ten.", [("gpt-4", "Eleven is prime and larger than ten.", 9.0), ("alpaca-7b", "Twelve is prime.", 3.0)])
    pq.write_table(pa.Table.from_pylist([record]), raw / "train-00000-of-00001.parquet")
    data = load_ultrafeedback(str(tmp_path / "raw"), english_only=False)
    assert [(p.chosen, p.rejected, p.score_chosen) for p in data.pairs] == [("Eleven is prime and larger than ten.", "Twelve is prime.", 9.0)]

    binarized = tmp_path / "bin" / "data"
    binarized.mkdir(parents=True)
    msgs = lambda answer: [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": answer}]  # noqa: E731
    rows = [{"prompt": "Say yes.", "prompt_id": "x", "chosen": msgs("Yes."), "rejected": msgs("No."), "score_chosen": 8.0, "score_rejected": 2.0}]
    pq.write_table(pa.Table.from_pylist(rows), binarized / "test-00000-of-00001.parquet")
    data = load_ultrafeedback(str(tmp_path / "bin"), "test")
    assert [(p.prompt, p.chosen, p.rejected) for p in data.pairs] == [("Say yes.", "Yes.", "No.")]
