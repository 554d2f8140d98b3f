"""The replica routing policy as plain Python (no Ray): prefixes stick, load balances."""

from __future__ import annotations

import pytest

from shadowkv.engine.prefix import block_hashes
from shadowkv.replicas.routing import (
    BLOCK_CHARS,
    NoReplicaError,
    PrefixRouter,
    RouterConfig,
    routing_text,
)

DOC = "The quick brown fox jumps over the lazy dog near the riverbank. " * 8  # 8 blocks+
UP2 = [True, True]


def test_short_prompts_without_a_whole_block_rotate_over_equal_loads() -> None:
    router = PrefixRouter(3)
    picks = [router.choose(f"hi {i}", [0, 0, 0], [True] * 3) for i in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]
    assert len(router) == 0 and router.prefix_picks == 0


def test_least_loaded_wins_without_a_prefix() -> None:
    router = PrefixRouter(3)
    assert router.choose(DOC, [5, 2, 3], [True] * 3) == 1


def test_a_shared_prefix_follows_its_replica_even_when_it_is_busier() -> None:
    router = PrefixRouter(2)
    first = router.choose(DOC + "Question one?", [0, 0], UP2)
    other = 1 - first
    loads = [0, 0]
    loads[first] = 3  # busier, but within max_imbalance (4)
    assert router.choose(DOC + "Question two?", loads, UP2) == first
    assert router.prefix_picks == 1
    # A different document goes to the least loaded replica.
    assert router.choose("A different document entirely. " * 8, loads, UP2) == other


def test_the_longest_shared_prefix_decides() -> None:
    router = PrefixRouter(2)
    a = "a" * (3 * BLOCK_CHARS)
    b = a[: BLOCK_CHARS] + "b" * (2 * BLOCK_CHARS)  # shares one block with a
    assert router.choose(a, [0, 0], UP2) == 0
    assert router.choose(b, [1, 0], UP2) == 0  # its first block was a's: follows it
    router.forget(0)
    assert router.choose(b, [0, 1], UP2) == 0  # forgotten: least loaded
    assert router.choose(a + "more", [5, 0], UP2) == 1  # over max_imbalance: balanced
    assert router.choose(a + "again", [5, 2], UP2) == 1  # and the prefix moved with it


def test_an_overloaded_prefix_replica_is_given_up_for_balance() -> None:
    router = PrefixRouter(2, RouterConfig(max_imbalance=1))
    assert router.choose(DOC, [0, 0], UP2) == 0
    assert router.choose(DOC, [1, 0], UP2) == 0  # 1 more in flight: within the slack
    assert router.choose(DOC, [2, 0], UP2) == 1  # 2 more: balance wins


def test_down_replicas_take_nothing() -> None:
    router = PrefixRouter(2)
    assert router.choose(DOC, [0, 0], UP2) == 0
    assert router.choose(DOC, [0, 9], [False, True]) == 1  # its prefix replica is down
    for _ in range(3):
        assert router.choose("short", [0, 0], [True, False]) == 0
    with pytest.raises(NoReplicaError, match="no replica is up"):
        router.choose(DOC, [0, 0], [False, False])


def test_forget_drops_only_that_replicas_prefixes() -> None:
    router = PrefixRouter(2)
    other = "Another long shared system prompt for everyone. " * 6
    assert router.choose(DOC, [0, 0], UP2) == 0
    assert router.choose(other, [1, 0], UP2) == 1
    router.forget(0)
    assert router.preferred(router.hashes(DOC)) is None
    assert router.preferred(router.hashes(other)) == 1


def test_the_table_is_bounded_least_recently_used_first() -> None:
    router = PrefixRouter(2, RouterConfig(max_entries=4))
    router.choose("x" * (3 * BLOCK_CHARS), [0, 0], UP2)  # 3 hashes
    router.choose("y" * (3 * BLOCK_CHARS), [0, 0], UP2)  # 3 more: the oldest 2 go
    assert len(router) == 4
    assert router.preferred(router.hashes("y" * (3 * BLOCK_CHARS))) is not None
    assert router.preferred(router.hashes("x" * (3 * BLOCK_CHARS))) is None  # block 0 evicted


def test_hashes_are_the_engines_block_hashes_of_character_codes() -> None:
    router = PrefixRouter(1, RouterConfig(max_blocks=2))
    text = DOC * 2
    assert router.hashes(text) == block_hashes([ord(c) for c in text[: 2 * BLOCK_CHARS]],
                                               BLOCK_CHARS)
    assert router.hashes(None) == [] and router.hashes("") == []


def test_routing_text_of_each_route() -> None:
    chat = {"messages": [{"role": "system", "content": "S"},
                         {"role": "user", "content": [{"type": "text", "text": "Q"}]}]}
    assert routing_text("/v1/chat/completions", chat) == "<system>S<user>Q"
    assert routing_text("/v1/completions", {"prompt": "P"}) == "P"
    assert routing_text("/v1/completions", {"prompt": ["P1", "P2"]}) == "P1"
    assert routing_text("/v1/completions", {"prompt": [1, 22, 3]}) == "1 22 3"
    assert routing_text("/v1/completions", {"prompt": {"bad": 1}}) is None
    assert routing_text("/v1/chat/completions", {"messages": "bad"}) is None
    assert routing_text("/v1/models", {}) is None
    assert routing_text("/v1/completions", None) is None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        PrefixRouter(0)
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        RouterConfig(max_entries=0)
    with pytest.raises(ValueError, match="max_imbalance must be >= 0"):
        RouterConfig(max_imbalance=-1)
    with pytest.raises(ValueError, match="one entry per replica"):
        PrefixRouter(2).choose("x", [0], [True])
