"""LLM judge (N+ detail 27) against a local OpenAI-compatible server on 127.0.0.1: the N+ prompt,
randomized order mapped back correctly, unparseable verdicts and failed requests counted (never
guessed), retries, the API key header."""

import pytest

from tldr_rlhf.judge import ChatClient, JudgeError, build_prompt, judge_pairs, parse_preference, verdict_from_letter

from judge_server import JudgeServer


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.stop()


def test_nplus_27_parse_preference_counts_anything_unclear_as_unparseable():
    assert parse_preference("Comparison: A is shorter and accurate.\nPreferred: A") == "A"
    assert parse_preference('Comparison: x\nPreferred: "B"') == "B"
    assert parse_preference("Comparison: x\n**Preferred:** b.") == "B"
    assert parse_preference("Preferred: (A)\n") == "A"
    assert parse_preference("Comparison: both fine.") is None  # no verdict line
    assert parse_preference("Preferred: A or B") is None  # not a single letter
    assert parse_preference('Preferred: <"A" or "B">') is None  # the template echoed back
    assert parse_preference("Preferred: A\nPreferred: B") is None  # contradicts itself
    assert parse_preference("Preferred: A\nPreferred: A") == "A"
    assert parse_preference("") is None


def test_verdict_maps_the_letter_back_through_the_order_shown():
    assert verdict_from_letter("A", True) == "policy" and verdict_from_letter("B", True) == "reference"
    assert verdict_from_letter("A", False) == "reference" and verdict_from_letter("B", False) == "policy"
    assert verdict_from_letter(None, True) is None


def test_build_prompt_is_the_nplus_prompt():
    p = build_prompt("  the post \n", " sum a", "sum b ")
    assert p.startswith("Which of the following summaries does a better job of summarizing the most important points")
    assert "### Post:\nthe post\n\n### Summary A:\nsum a\n\n### Summary B:\nsum b\n\n### Instructions:" in p
    assert p.rstrip().endswith('Preferred: <"A" or "B">')


def test_nplus_27_judge_pairs_randomized_order_unparseable_and_failed_counted(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "test-key")
    client = ChatClient(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY", timeout_s=5, retries=1, backoff_s=0.01)
    good, bad = "a good summary", "a weak summary"
    items = [  # (post, policy summary, reference)
        ("post 1", good, bad), ("post 2", good, bad), ("post 3", good, bad), ("post 4", bad, good), ("post 5", bad, good),
        ("post 6 GARBAGE", good, bad), ("post 7 FAIL", good, bad), ("post 8 FLAKY", good, bad), ("post 9 BADREQ", good, bad),
    ]
    verdicts = judge_pairs(client, *zip(*items), seed=3, max_parallel=4)
    orders = [v.policy_first for v in verdicts]
    assert True in orders and False in orders  # both orders were shown
    assert [v.preferred for v in verdicts] == ["policy", "policy", "policy", "reference", "reference", None, None, "policy", None]
    assert [v.error is not None for v in verdicts] == [False] * 6 + [True, False, True]
    # 4 wins, 2 losses; GARBAGE unparseable, FAIL (500 twice) and BADREQ (400) failed: 3 without a verdict
    assert [v.outcome for v in verdicts] == [1.0, 1.0, 1.0, 0.0, 0.0, None, None, 1.0, None]
    by_post = {}
    for r in server.requests:
        by_post.setdefault(r["body"]["messages"][-1]["content"].split("### Post:\n")[1].split("\n")[0], []).append(r)
    assert len(by_post["post 7 FAIL"]) == 2 and len(by_post["post 8 FLAKY"]) == 2 and len(by_post["post 9 BADREQ"]) == 1  # 1 retry; none on 4xx
    r = server.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer test-key"
    assert r["body"]["model"] == "judge-model" and "temperature" not in r["body"]  # N+ sent no temperature
    assert r["body"]["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    # the same seed gives the same orders
    assert [v.policy_first for v in judge_pairs(client, *zip(*items[:5]), seed=3)] == orders[:5]


def test_chat_client_errors(server):
    with pytest.raises(JudgeError, match="http"):
        ChatClient("127.0.0.1:8000/v1", "m")
    client = ChatClient(server.url, "m", api_key_env="", timeout_s=5, retries=0, temperature=0.0)
    assert client.complete(build_prompt("post", "good one", "other")).endswith("Preferred: A")
    assert server.requests[-1]["auth"] is None and server.requests[-1]["body"]["temperature"] == 0.0
    with pytest.raises(JudgeError, match="HTTP 500"):
        client.complete(build_prompt("FAIL", "a", "b"))
    closed = ChatClient("http://127.0.0.1:9/v1", "m", timeout_s=2, retries=0)  # nothing listens on port 9
    with pytest.raises(JudgeError, match="failed after 1 attempts"):
        closed.complete("x")
    with pytest.raises(ValueError, match="lengths differ"):
        judge_pairs(client, ["p"], ["a", "b"], ["r"])
