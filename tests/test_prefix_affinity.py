"""Prefix affinity (the rule behind the Ray Serve router), without Ray: block hashes, the prompt
text of each request shape, matching, forgetting and the choice under load."""

from __future__ import annotations

import pytest

from async_llm.serve.prefix_affinity import PrefixAffinity, block_hashes, routing_text
from async_llm.serve.protocol import ChatCompletionRequest, CompletionRequest

SYSTEM = "You are a careful assistant for a hardware shop. " * 8  # 392 characters: 6 whole blocks


def chat(system: str, user: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_block_hashes_are_chained_whole_blocks_and_stable():
    text = "a" * 64 + "b" * 64 + "c" * 10
    hashes = block_hashes(text, block_chars=64)
    assert len(hashes) == 2  # the trailing partial block is not hashed
    assert block_hashes(text, block_chars=64) == hashes  # no per-process salt
    # The same second block after a different first block hashes differently: a chain, not a bag.
    assert block_hashes("x" * 64 + "b" * 64, block_chars=64)[1] != hashes[1]
    assert block_hashes("a" * 64 + "b" * 64 + "d" * 64, block_chars=64)[:2] == hashes
    assert len(block_hashes("z" * 10_000, block_chars=64, max_blocks=5)) == 5
    assert block_hashes("short", block_chars=64) == []


def test_routing_text_reads_every_request_shape():
    body = chat(SYSTEM, "Hi")
    text = routing_text(body)
    assert text is not None and SYSTEM in text and text.endswith("Hi")
    # A pydantic request and its dict give the same text; so do content parts and a plain string.
    assert routing_text(ChatCompletionRequest.model_validate(body)) == text
    parts = chat(SYSTEM, "Hi")
    parts["messages"][0]["content"] = [{"type": "text", "text": SYSTEM}]
    assert routing_text(parts) == text
    # Roles are part of the text: the same words as user and as system are different prompts.
    swapped = {"messages": [{"role": "user", "content": SYSTEM}, {"role": "user", "content": "Hi"}]}
    assert routing_text(swapped) != text
    # Tools come first (chat templates render them before the messages).
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with_tools = routing_text({**body, "tools": tools})
    assert with_tools is not None and with_tools.endswith(text) and "lookup" in with_tools

    assert routing_text({"prompt": "Once upon a time"}) == "Once upon a time"
    assert routing_text(CompletionRequest.model_validate({"prompt": "Once"})) == "Once"
    assert routing_text({"prompt": [1, 2, 3]}) == "1,2,3"
    assert routing_text({"prompt": ["first", "second"]}) == "first"
    assert routing_text({"prompt": [[4, 5], [6]]}) == "4,5"
    assert routing_text({"instructions": "Be brief.", "input": "Hello"}) == "Be brief.Hello"
    assert routing_text({"model": "m"}) is None
    assert routing_text(object()) is None
    assert routing_text({"prompt": ""}) is None


def test_same_prefix_goes_to_the_replica_that_has_it():
    affinity: PrefixAffinity[str] = PrefixAffinity(imbalance_threshold=4)
    replicas = ["a", "b"]
    loads = {"a": 0, "b": 0}
    first = affinity.hashes(routing_text(chat(SYSTEM, "What does a router do?")))
    # Nothing seen yet: the least loaded replica, ties broken by a hash of the first block.
    chosen = affinity.rank(replicas, loads, first)[0]
    affinity.record(chosen, first)
    other = "b" if chosen == "a" else "a"
    # A different question under the same system prompt matches its blocks on `chosen`, even with
    # a little more load there.
    second = affinity.hashes(routing_text(chat(SYSTEM, "And a switch?")))
    assert affinity.matched_blocks(chosen, second) >= 6 and affinity.matched_blocks(other, second) == 0
    assert affinity.rank(replicas, {chosen: 3, other: 0}, second) == [chosen, other]
    # A new system prompt goes to the replica remembering fewer blocks when loads are equal.
    new = affinity.hashes(routing_text(chat("Answer as a ship's captain would. " * 10, "Ahoy")))
    assert affinity.rank(replicas, loads, new)[0] == other


def test_a_short_shared_preamble_does_not_pull_every_prompt_to_one_replica():
    """Prompts that share only a generic first block spread by load; each follows its own prefix."""
    affinity: PrefixAffinity[str] = PrefixAffinity(imbalance_threshold=8)
    preamble = "You are a helpful assistant working for a company that sells things."  # > one block
    prompts = [routing_text(chat(f"{preamble} Topic {n}: " + f"details of topic {n}. " * 20, "Q")) for n in range(4)]
    hashes = [affinity.hashes(p) for p in prompts]
    assert len({h[0] for h in hashes}) == 1 and len(hashes[0]) > 4  # the first block is shared
    homes = []
    loads = {"a": 0, "b": 0}
    for h in hashes:  # each new prompt goes to the replica with the smaller record
        home = affinity.rank(["a", "b"], loads, h)[0]
        affinity.record(home, h)
        loads[home] += 1
        homes.append(home)
    assert sorted(homes) == ["a", "a", "b", "b"]
    for h, home in zip(hashes, homes, strict=True):  # later requests of each prompt follow it
        assert affinity.rank(["a", "b"], loads, h)[0] == home
    # A long shared prefix routes by affinity even when it is under half of a longer prompt.
    long_prefix = "x" * 64 * 40
    affinity.record("b", affinity.hashes(long_prefix))
    assert affinity.rank(["a", "b"], {"a": 0, "b": 2}, affinity.hashes(long_prefix + "y" * 64 * 60))[0] == "b"


def test_an_overloaded_replica_is_passed_over_for_the_least_loaded():
    affinity: PrefixAffinity[str] = PrefixAffinity(imbalance_threshold=4)
    hashes = affinity.hashes(routing_text(chat(SYSTEM, "Hi")))
    affinity.record("a", hashes)
    assert affinity.rank(["a", "b", "c"], {"a": 4, "b": 0, "c": 1}, hashes)[0] == "a"  # within the threshold
    assert affinity.rank(["a", "b", "c"], {"a": 5, "b": 1, "c": 0}, hashes) == ["c", "b", "a"]
    # A new prefix goes to the smaller record, but never past the load tolerance.
    new = affinity.hashes("a new prompt nobody has sent, long enough for two blocks of text. " * 2)
    assert affinity.rank(["a", "b"], {"a": 4, "b": 0}, new)[0] == "b"  # "a" remembers blocks, "b" none
    affinity.record("b", affinity.hashes("filler " * 200))
    assert affinity.remembered("b") > affinity.remembered("a")
    assert affinity.rank(["a", "b"], {"a": 4, "b": 0}, new)[0] == "a"  # within 4 of the least loaded
    assert affinity.rank(["a", "b"], {"a": 5, "b": 0}, new)[0] == "b"  # past it
    # Unknown loads (no figure yet) count as idle; every candidate is ranked, none dropped.
    assert sorted(affinity.rank(["a", "b"], {}, hashes)) == ["a", "b"]
    assert affinity.rank([], {}, hashes) == []


def test_longest_match_wins_and_memory_is_bounded_and_forgotten():
    affinity: PrefixAffinity[str] = PrefixAffinity(block_chars=8, max_blocks_per_replica=4)
    base = "0123456789abcdef" * 4  # 8 blocks of 8
    affinity.record("short", affinity.hashes(base[:16]))  # 2 blocks
    affinity.record("long", affinity.hashes(base[:32]))  # 4 blocks
    hashes = affinity.hashes(base)
    assert affinity.rank(["short", "long"], {"short": 0, "long": 1}, hashes)[0] == "long"
    # Past its bound a replica forgets its least recently routed blocks first.
    affinity.record("long", affinity.hashes("zyxwvuts" * 2))
    assert affinity.remembered("long") == 4 and affinity.matched_blocks("long", hashes) == 0
    affinity.keep_only(["long"])
    assert affinity.remembered("short") == 0 and affinity.matched_blocks("short", hashes) == 0
    affinity.forget("long")
    assert affinity.remembered("long") == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("imbalance_threshold", -1),
        ("block_chars", 0),
        ("max_blocks", 0),
        ("max_blocks_per_replica", True),
        ("match_blocks", 0),
        ("match_fraction", 0),
        ("match_fraction", 1.5),
        ("match_fraction", "half"),
    ],  # fmt: skip
)
def test_bad_sizes_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        PrefixAffinity(**{name: value})


def test_a_response_id_names_the_server_that_keeps_it():
    from async_llm.serve.responses import response_server

    assert response_server("resp_abc123_0f9e") == "abc123"
    assert response_server("resp_0f9e") is None and response_server("resp_") is None
    assert response_server("chatcmpl_x_y") is None and response_server(None) is None
