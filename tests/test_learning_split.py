"""Issue 26's held-out split (docs/learning.md): exactly ``valid_count`` posts held out by the sha256
position of their id, the same set whatever the file order, disjoint from the training side."""

import json
import random
from dataclasses import replace

import pytest

from tldr_rlhf.config import TldrDataArgs
from tldr_rlhf.data import io
from tldr_rlhf.data.tldr import load_post_splits
from tldr_rlhf.errors import DataError
from tldr_rlhf.presets import LOCAL_POSTS


def test_held_out_keys_are_the_lowest_hash_positions_by_hand():
    keys = ["a", "b", "c", "d", "e"]
    order = sorted(keys, key=lambda k: io.split_position(k))
    assert io.held_out_keys(keys, 2) == set(order[:2])
    assert io.held_out_keys(list(reversed(keys)) + ["a"], 2) == set(order[:2])  # order and repeats do not matter
    # sha256("tldr-rlhf" + "a"), first 15 hex digits over 16**15: a fixed point in [0, 1)
    assert 0.0 <= io.split_position("a") < 1.0 and io.split_position("a") == io.split_position("a", "tldr-rlhf")
    with pytest.raises(ValueError, match="cannot hold out 6 of 5"):
        io.held_out_keys(keys, 6)


def test_400_of_the_1600_local_posts_held_out_disjoint_and_stable_under_shuffling(tmp_path):
    data = TldrDataArgs(train=LOCAL_POSTS, valid_count=400, limit=0)
    train, valid = load_post_splits(data)
    train_ids, valid_ids = {p.id for p in train}, {p.id for p in valid}
    assert (len(train), len(valid)) == (1200, 400) and (len(train_ids), len(valid_ids)) == (1200, 400)
    assert not train_ids & valid_ids
    lines = open(LOCAL_POSTS).read().splitlines()
    random.Random(7).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    train2, valid2 = load_post_splits(replace(data, train=str(shuffled)))
    assert {p.id for p in valid2} == valid_ids and {p.id for p in train2} == train_ids


def test_holding_out_more_posts_than_the_file_has_is_one_line(tmp_path):
    f = tmp_path / "posts.jsonl"
    f.write_text("".join(json.dumps({"id": f"p{i}", "subreddit": "s", "title": "t", "post": "a post", "summary": " s"}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match="cannot hold out 4 of 3 distinct post ids"):
        load_post_splits(TldrDataArgs(train=str(f), valid_count=4))
