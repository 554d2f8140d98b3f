"""Prefix sharing (engine/prefix.py): the store, the suffix attention, and the engine using them.

Shared prefills must give the tokens unshared ones do (prefill attention is exact in every
method, so for every method), a conversation's next turn must reuse the previous prompt, and the
cache must return to idle whatever happens to a request that reads a stored prefix. Caches of the
dense pool (``PAGED``) share the prefix's cache pages themselves: their requests must hold the
prefix once, and the store must give its pages up before an admission fails or a request is
preempted.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from utils import small_cache_cfg as cache_cfg

from shadowkv import LLM, EngineConfig, SamplingParams
from shadowkv.cache.base import AttentionCache
from shadowkv.cache.dense import BLOCKS
from shadowkv.cache.methods import ShadowKVConfig
from shadowkv.cache.shadow import ShadowKVCache
from shadowkv.engine.engine import Engine
from shadowkv.engine.prefix import BLOCK, PrefixStore, block_hashes
from shadowkv.engine.prompt_kv import RecordingCache

DOC = [(7 * i) % 90 + 3 for i in range(200)]  # 200 tokens: 12 whole blocks
QUESTIONS = [[5, 6, 7], [8, 9, 10, 11], [12]]
METHODS = ["dense", "shadowkv", "quest", "loki", "streaming", "oracle"]
PAGED = ["dense", "quest", "loki", "streaming", "oracle"]  # the store holds their cache pages


# --- the store ------------------------------------------------------------------------------


def kv(n: int, fill: float = 0.0) -> list[tuple[torch.Tensor, ...]]:
    """Two layers of ``(k, v, k_pre)`` ``[n, 1, 2]``, row ``i`` holding ``fill + i``."""
    rows = (torch.arange(n, dtype=torch.float32) + fill)[:, None, None].expand(n, 1, 2)
    return [(rows.clone(), rows.clone(), rows.clone()) for _ in range(2)]


def test_block_hashes_chain_their_parents() -> None:
    a, b = block_hashes(list(range(40))), block_hashes([99] + list(range(1, 40)))
    assert len(a) == 2 and len(b) == 2  # whole blocks only
    assert a[0] != b[0] and a[1] != b[1]  # block 1 is equal, but its parent is not


def test_finds_the_longest_whole_block_prefix_and_keeps_one_token_to_prefill() -> None:
    store = PrefixStore(1 << 20)
    assert store.put(DOC, kv(len(DOC)))
    use = store.find_prefix(DOC[:100] + [1, 2])  # 102 tokens share 100: 6 whole blocks
    assert use is not None and use.num_tokens == 96
    assert use.layer(0)[0][:, 0, 0].tolist() == list(range(96))
    assert store.find_prefix(DOC[:192]).num_tokens == 176  # the last token is prefilled
    assert store.find_prefix([1] + DOC[1:]) is None
    assert store.find_prefix(DOC[:10]) is None


def test_a_hash_collision_is_not_shared(monkeypatch) -> None:
    store = PrefixStore(1 << 20)
    store.put(DOC, kv(len(DOC)))
    entry = next(iter(store._entries.values()))
    object.__setattr__(entry, "tokens", (0,) * len(entry.tokens))  # hashes match, tokens do not
    assert store.find_prefix(DOC) is None


def test_lru_eviction_drops_the_least_recently_used() -> None:
    one = sum(t.numel() * t.element_size() for layer in kv(64) for t in layer)
    store = PrefixStore(2 * one)
    docs = [[d * 1000 + i for i in range(64)] for d in range(3)]
    store.put(docs[0], kv(64))
    store.put(docs[1], kv(64))
    held = store.find_prefix(docs[0] + [1])  # docs[0] is now the most recently used
    store.put(docs[2], kv(64))  # evicts docs[1], the least recently used
    assert store.find_prefix(docs[1] + [1]) is None
    assert held is not None and store.nbytes == 2 * one
    assert not store.put([7] * 192, kv(192))  # over the whole budget: not stored, nothing evicted
    assert len(store) == 2
    store.clear()
    assert len(store) == 0 and store.nbytes == 0
    assert held.layer(1)[1].shape == (64, 1, 2)  # a use read before eviction stays readable


def test_the_next_turn_replaces_the_previous_one() -> None:
    store = PrefixStore(1 << 20)
    store.put(DOC[:100], kv(100))
    store.put(DOC, kv(200))  # the previous prompt + answer + message
    assert len(store) == 1 and store.find_prefix(DOC[:100] + [3]).num_tokens == 96


# --- the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_layers=4, vocab_size=96)


def make_llm(path: Path, method: str = "dense", on: bool = True, **engine) -> LLM:
    cfg = EngineConfig(**{"cache_memory_gb": 0.01, "prefix_cache": on, **engine})
    return LLM(str(path), cache=cache_cfg(method), engine=cfg, device="cpu")


def answers(llm: LLM, prompts: list[list[int]], n: int = 8) -> list[tuple[list[int], int]]:
    out = []
    for p in prompts:
        r = llm.generate(p, SamplingParams(max_tokens=n))[0]
        out.append((r.token_ids, r.metrics["cached_tokens"]))
    return out


def allocators(engine: Engine) -> list:
    parts = getattr(engine.cache, "parts", [engine.cache])
    return [a for c in parts for a in c.allocators.values()]


def idle(engine: Engine) -> None:
    """No request holds memory; once the store lets its entries go, no page is in use."""
    assert not engine.has_unfinished()
    assert engine.cache.memory().device_bytes == 0 and engine.cache.memory().host_bytes == 0
    assert engine.prefix_store is not None
    engine.clear_prefix_cache()
    assert len(engine.prefix_store) == 0 and engine.prefix_memory().device_bytes == 0
    assert all(a.num_used == 0 for a in allocators(engine))


# ShadowKV shares its prefix's factor, landmark and value pages: exact at full rank (32 key
# columns here) with every landmark of the shared page selected (a 128-token budget; the 203-token
# prompts stay sparse), where its requests answer as dense attention does.
FULL_SHADOW = ShadowKVConfig(sparse_budget=128, outlier_chunks=2, rank=32)


@pytest.mark.parametrize("method", METHODS)
def test_shared_prefills_answer_as_unshared_ones(path: Path, method: str) -> None:
    prompts = [DOC + q for q in QUESTIONS]
    if method == "shadowkv":
        plain = answers(make_llm(path, "dense", on=False), prompts)
        cfg = EngineConfig(cache_memory_gb=0.01, prefix_cache=True)
        llm = LLM(str(path), cache=FULL_SHADOW, engine=cfg, device="cpu")
        n = 128  # one factor page: ShadowKV shares whole pages inside the prompt's candidates
    else:
        plain = answers(make_llm(path, method, on=False), prompts)
        llm = make_llm(path, method)
        n = 192
    shared = answers(llm, prompts)
    # ShadowKV's first request, sparse and unshared, is not exact: the shared ones are.
    first = 1 if method == "shadowkv" else 0
    assert [t for t, _ in shared][first:] == [t for t, _ in plain][first:]
    assert [c for _, c in plain] == [0, 0, 0]
    assert [c for _, c in shared] == [0, n, n]
    c = llm.engine.counters
    assert c["prefix_hits"] == 2 and c["cached_tokens"] == 2 * n
    assert c["prefill_tokens"] == sum(map(len, prompts)) - 2 * n
    assert llm.engine.shares_pages
    assert llm.engine.prefix_store.nbytes == 0  # cache pages, no host copies
    assert llm.engine.prefix_memory().device_bytes > 0
    if method in PAGED:  # the store holds the last prompt's 12 whole blocks
        block = llm.engine.cache.blocks.page_bytes
        assert llm.engine.prefix_memory().device_bytes == 12 * block
    idle(llm.engine)


@pytest.mark.parametrize("method", PAGED)
def test_a_conversation_reuses_the_previous_turn(path: Path, method: str) -> None:
    llm, plain = make_llm(path, method), make_llm(path, method, on=False)
    prompt, previous = DOC[:150], 0
    for turn in range(3):
        want = plain.generate(prompt, SamplingParams(max_tokens=6))[0]
        got = llm.generate(prompt, SamplingParams(max_tokens=6))[0]
        assert got.token_ids == want.token_ids, turn
        # Each turn starts with the previous prompt (+ answer + message): its blocks are cached.
        assert got.metrics["cached_tokens"] == previous // BLOCK * BLOCK
        previous = len(prompt)
        prompt = prompt + got.token_ids + [40 + turn, 41, 42]
    assert len(llm.engine.prefix_store) == 1  # each turn replaced the one before
    idle(llm.engine)


def test_window_layers_share_prefixes(tiny_checkpoint) -> None:
    path = tiny_checkpoint(  # two sliding-window layers (WindowCache) and a global one
        "gemma3", num_layers=3, vocab_size=96, sliding_window=24, query_pre_attn_scalar=16,
        layer_types=["sliding_attention"] * 2 + ["full_attention"],
    )
    prompts = [DOC + q for q in QUESTIONS]
    engine = dict(cache_memory_gb=0.01)
    runs = []
    for on in (False, True):
        llm = LLM(str(path), engine=EngineConfig(prefix_cache=on, **engine), device="cpu")
        runs.append(answers(llm, prompts))
    assert [t for t, _ in runs[1]] == [t for t, _ in runs[0]]
    assert [c for _, c in runs[1]] == [0, 192, 192]


@pytest.mark.parametrize("method", ["shadowkv", *PAGED])
def test_samples_of_a_shared_prompt(path: Path, method: str) -> None:
    # ShadowKV cannot fork: its samples replay the first one's recorded prefill, so the first
    # one prefills the whole prompt (a stored prefix gives no K/V to record). The dense pool
    # forks: each sample holds the stored prefix's blocks too and gets a copy of the rest.
    llm = make_llm(path, method)
    engine = llm.engine
    answers(llm, [DOC + [1]])
    params = [SamplingParams(max_tokens=5, temperature=0)] * 2
    reqs = engine.add_requests(DOC + [2, 3], params)
    engine.step()
    if method != "shadowkv":
        (entry,) = engine.prefix_store._entries.values()
        shared = entry.shared.pages[BLOCKS]
        tables = [engine.cache.seqs[r.request_id].pages[BLOCKS] for r in reqs]
        assert tables[0][:12] == tables[1][:12] == shared
        assert not set(tables[0][12:]) & set(tables[1][12:])
        assert engine.counters["forked_samples"] == 1
    while engine.has_unfinished():
        engine.step()
    plain = answers(make_llm(path, method, on=False), [DOC + [2, 3]], 5)[0][0]
    assert [r.output_ids for r in reqs] == [plain, plain]
    assert reqs[0].cached_tokens == (0 if method == "shadowkv" else 192)
    idle(engine)


def test_abort_during_a_shared_prefill_returns_to_idle(path: Path) -> None:
    llm = make_llm(path, max_num_batched_tokens=40)  # b's 100-token suffix goes in chunks
    engine = llm.engine
    answers(llm, [DOC + [1]])
    a = engine.add_request([3, 4, 5], SamplingParams(max_tokens=20))
    engine.step()
    b = engine.add_request(DOC + [9] * 100, SamplingParams(max_tokens=4))
    engine.step()
    assert engine.prefilling is b and b.cached_tokens == 192
    engine.abort(b.request_id)
    engine.abort(a.request_id)
    idle(engine)


def test_a_failure_during_a_suffix_prefill_returns_to_idle(path: Path, monkeypatch) -> None:
    llm = make_llm(path)
    engine = llm.engine
    answers(llm, [DOC + [1]])
    assert engine.shares_pages
    real = AttentionCache.prefill_kv  # the suffix's layers

    def failing(self, layer, *args):  # type: ignore[no-untyped-def]
        if layer == 2:
            raise RuntimeError("injected")
        return real(self, layer, *args)

    monkeypatch.setattr(AttentionCache, "prefill_kv", failing)
    b = engine.add_request(DOC + [2], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.abort(b.request_id)  # what the server's worker does when a step fails
    assert not engine.has_unfinished() and engine.cache.memory().device_bytes == 0
    assert engine.cache.blocks.num_used == 12  # the store's entry alone
    monkeypatch.undo()
    assert answers(llm, [DOC + [2]])[0][1] == 192  # the store still serves
    idle(engine)


def test_a_prefix_evicted_while_a_request_waits_is_recomputed(path: Path) -> None:
    llm = make_llm(path)
    engine = llm.engine
    answers(llm, [DOC + [1]])
    b = engine.add_request(DOC + [2], SamplingParams(max_tokens=6))
    engine.prefix_store.clear()  # forced eviction before b is admitted
    while engine.has_unfinished():
        engine.step()
    assert b.cached_tokens == 0
    assert b.output_ids == answers(make_llm(path, on=False), [DOC + [2]], 6)[0][0]
    idle(engine)


def test_a_prefix_evicted_while_its_prefill_runs_changes_nothing(path: Path) -> None:
    llm = make_llm(path, max_num_batched_tokens=40)
    engine = llm.engine
    answers(llm, [DOC + [1]])
    a = engine.add_request([3, 4, 5], SamplingParams(max_tokens=30))
    engine.step()
    b = engine.add_request(DOC + [9] * 100, SamplingParams(max_tokens=4))
    engine.step()  # b got the prefix and ran its suffix's first chunk
    assert engine.prefilling is b
    engine.prefix_store.clear()  # forced eviction mid-prefill: b keeps its own reference
    while engine.has_unfinished():
        engine.step()
    assert b.cached_tokens == 192 and a.finish_reason == "length"
    assert b.output_ids == answers(make_llm(path, on=False), [DOC + [9] * 100], 4)[0][0]
    idle(engine)


def test_a_prompt_the_store_cannot_keep_is_not_recorded(path: Path, monkeypatch) -> None:
    probe = make_llm(path).engine
    c = probe.model_cfg
    per_token = c.num_layers * 3 * c.num_kv_heads * c.head_dim * 4  # fp32 on the CPU
    # A cache that does not share its pages (window layers; ShadowKV with share_prefix_memory
    # off) keeps host copies (room for 96 tokens' K/V); page entries take none.
    cfg = EngineConfig(cache_memory_gb=0.01, prefix_cache=True,
                       prefix_cache_gb=100 * per_token / 2**30)
    shadow = replace(cache_cfg("shadowkv"), share_prefix_memory=False)
    llm = LLM(str(path), cache=shadow, engine=cfg, device="cpu")
    assert not llm.engine.shares_pages
    engine = llm.engine
    recorded: list[int] = []
    real = RecordingCache.result

    def result(self, token_ids, logits):  # type: ignore[no-untyped-def]
        recorded.append(len(token_ids))
        return real(self, token_ids, logits)

    monkeypatch.setattr(RecordingCache, "result", result)
    answers(llm, [DOC + [1]])  # 192 whole-block tokens: over the budget, never copied to host
    assert recorded == [] and len(engine.prefix_store) == 0
    short = DOC[:80]
    assert answers(llm, [short + [1], short + [2]])[1][1] == 80  # 80 tokens fit: stored, shared
    assert recorded == [81, 81]
    idle(engine)


# --- the cache's own pages (the dense pool) ----------------------------------------------------


def sized_llm(path: Path, blocks: int, method: str = "dense", on: bool = True, **engine) -> LLM:
    """An engine whose cache holds exactly ``blocks`` blocks of 16 tokens."""
    per_block = make_llm(path, method).engine.cache.block_bytes()
    gb = (blocks + 1) * per_block / 2**30
    llm = make_llm(path, method, on, **{**engine, "cache_memory_gb": gb})
    assert llm.engine.cache.blocks.capacity == blocks
    return llm


def run(engine: Engine, prompts: list[list[int]], n: int = 8) -> list:
    reqs = [engine.add_request(p, SamplingParams(max_tokens=n)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return reqs


def test_live_requests_hold_a_shared_prefix_once(path: Path) -> None:
    prompts = [DOC + q for q in QUESTIONS[:2]]  # 203 and 204 tokens + 8 new: 14 blocks each
    used = {}
    for on in (False, True):
        engine = make_llm(path, on=on).engine
        run(engine, [DOC + [1]])  # stores DOC's 12 blocks (with sharing on)
        reqs = [engine.add_request(p, SamplingParams(max_tokens=8)) for p in prompts]
        engine.step()  # both prefilled: each holds its blocks
        assert all(r in engine.running for r in reqs)
        used[on] = (engine.cache.blocks.num_used, engine.cache.memory().device_bytes)
        while engine.has_unfinished():
            engine.step()
    idle(engine)
    block = engine.cache.blocks.page_bytes
    assert used[False] == (28, 28 * block)
    # The store's 12 blocks, which both requests hold too, and 2 blocks of each one's own.
    assert used[True] == (12 + 2 + 2, (12 + 2 + 2) * block)


def test_admission_counts_the_shared_blocks_once(path: Path) -> None:
    prompts = [DOC + q for q in QUESTIONS[:2]]
    plain = [r.output_ids for r in run(make_llm(path, on=False).engine, prompts)]
    engine = sized_llm(path, 20).engine  # 14 blocks each: only one fits unshared
    run(engine, [DOC + [1]])
    reqs = [engine.add_request(p, SamplingParams(max_tokens=8)) for p in prompts]
    engine.step()
    assert all(r in engine.running for r in reqs)  # both admitted at once: 16 blocks
    assert engine.cache.blocks.num_used == 16 and len(engine.prefix_store) == 1
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in reqs] == plain
    assert [r.cached_tokens for r in reqs] == [192, 192]
    idle(engine)


def test_the_store_gives_its_pages_up_for_an_admission(path: Path) -> None:
    other = [(5 * i) % 90 + 3 for i in range(200)]  # another document: 14 blocks with its answer
    plain = run(make_llm(path, on=False).engine, [other + [1]])[0].output_ids
    engine = sized_llm(path, 20).engine
    run(engine, [DOC + [1]])
    assert engine.cache.blocks.num_used == 12  # the store's entry: 8 blocks free
    (req,) = run(engine, [other + [1]])
    assert req.output_ids == plain and req.cached_tokens == 0
    assert engine.counters["preemptions"] == 0
    # DOC's entry was evicted to admit it; its own prompt is stored now.
    assert engine.prefix_store.cached_tokens(DOC + [1]) == 0
    assert engine.prefix_store.cached_tokens(other + [2]) == 192
    idle(engine)


def test_the_store_gives_its_pages_up_before_a_preemption(path: Path) -> None:
    prompt = [(5 * i) % 90 + 3 for i in range(100)]  # grows to 200 tokens: 13 blocks
    plain = run(make_llm(path, on=False).engine, [prompt], 100)[0].output_ids
    engine = sized_llm(path, 20, admission_reserve=1).engine
    run(engine, [DOC + [1]], 2)  # the store keeps 12 blocks
    (req,) = run(engine, [prompt], 100)
    assert req.output_ids == plain and req.finish_reason == "length"
    assert engine.counters["preemptions"] == 0 and len(engine.prefix_store) == 1
    assert engine.prefix_store.cached_tokens(DOC + [1]) == 0  # evicted for the growth
    idle(engine)


def test_an_abort_mid_decode_returns_to_idle(path: Path) -> None:
    engine = make_llm(path).engine
    run(engine, [DOC + [1]])
    req = engine.add_request(DOC + [2], SamplingParams(max_tokens=20))
    for _ in range(3):
        engine.step()
    assert req in engine.running and req.cached_tokens == 192
    engine.abort(req.request_id)
    assert engine.cache.blocks.num_used == 12  # the store's entry alone
    idle(engine)


def test_a_prefix_evicted_while_its_request_decodes_changes_nothing(path: Path) -> None:
    plain = run(make_llm(path, on=False).engine, [DOC + [2]], 12)[0].output_ids
    engine = make_llm(path).engine
    run(engine, [DOC + [1]])
    req = engine.add_request(DOC + [2], SamplingParams(max_tokens=12))
    for _ in range(3):
        engine.step()
    assert req in engine.running and req.cached_tokens == 192
    blocks = engine.cache.seqs[req.request_id].pages[BLOCKS]
    engine.clear_prefix_cache()  # forced eviction: the request keeps its own references
    assert all(engine.cache.blocks.refcount(b) == 1 for b in blocks)
    assert engine.cache.blocks.num_used == len(blocks)
    while engine.has_unfinished():
        engine.step()
    assert req.output_ids == plain
    idle(engine)


def test_cache_page_entries_do_not_count_against_the_host_budget(path: Path) -> None:
    llm = make_llm(path, prefix_cache_gb=1e-9)  # no room for any host copy
    got = answers(llm, [DOC + [1], DOC + [2]])
    assert [c for _, c in got] == [0, 192] and llm.engine.prefix_store.nbytes == 0
    idle(llm.engine)


@pytest.mark.parametrize("batched", [2048, 48])  # the suffix prefilled whole, or in chunks
def test_shadowkv_conversation_turns_keep_their_suffix_as_segment_1(
    path: Path, batched: int, monkeypatch
) -> None:
    """ShadowKV at full rank, with ``shared_suffix_tokens`` small: turns 2 and 3 start from
    turn 1's 128 shared tokens and store their 81- and 90-token suffixes as segment 1 (own
    basis). A per-request budget selecting every landmark of both segments gives dense's
    greedy tokens."""
    from shadowkv.cache.base import CacheOptions
    from shadowkv.cache.methods import DenseConfig, ShadowKVConfig

    suffixes: list[int] = []
    real = ShadowKVCache._store_suffix

    def counted(self, layer, plan, k, *args):  # type: ignore[no-untyped-def]
        if layer == 0:
            suffixes.append(k.shape[0])
        return real(self, layer, plan, k, *args)

    monkeypatch.setattr(ShadowKVCache, "_store_suffix", counted)
    shadow = ShadowKVConfig(
        sparse_budget=1024, local_chunks=2, outlier_chunks=2, rank=1.0, shared_suffix_tokens=16
    )
    engine = {"cache_memory_gb": 0.01, "max_num_batched_tokens": batched}
    llm = LLM(str(path), cache=shadow, engine=EngineConfig(prefix_cache=True, **engine),
              device="cpu")
    plain = LLM(str(path), cache=DenseConfig(), engine=EngineConfig(**engine), device="cpu")
    prompt = DOC[:200]
    cached = []
    for turn in range(3):
        want = plain.generate(prompt, SamplingParams(max_tokens=6))[0]
        every = CacheOptions(sparse_budget=(len(prompt) // 8 - 4) * 8)  # 2 + 2 chunks exact
        got = llm.generate(prompt, SamplingParams(max_tokens=6), cache_options=every)[0]
        assert got.token_ids == want.token_ids, turn
        cached.append(got.metrics["cached_tokens"])
        prompt = prompt + got.token_ids + [40 + turn, 41, 42]
    assert cached == [0, 128, 128] and suffixes == [81, 90]
    idle(llm.engine)


def test_shadowkv_without_shared_memory_prefills_exactly_from_host_copies(path: Path) -> None:
    """``share_prefix_memory=False``: ShadowKV's store keeps host copies and a request replays
    its prefix (every sequence storing its own copy), so shared prefills answer exactly as
    unshared ones, at any rank and budget."""
    prompts = [DOC + q for q in QUESTIONS]
    plain = answers(make_llm(path, "shadowkv", on=False), prompts)
    cfg = EngineConfig(cache_memory_gb=0.01, prefix_cache=True)
    shadow = replace(cache_cfg("shadowkv"), share_prefix_memory=False)
    llm = LLM(str(path), cache=shadow, engine=cfg, device="cpu")
    shared = answers(llm, prompts)
    assert not llm.engine.shares_pages and llm.engine.prefix_store.nbytes > 0
    assert [t for t, _ in shared] == [t for t, _ in plain]
    assert [c for _, c in shared] == [0, 192, 192]
    idle(llm.engine)


@pytest.mark.parametrize("exact", [True, False])
def test_shadowkv_exact_prefix_keys_give_the_unshared_first_token(path: Path, exact: bool) -> None:
    """ShadowKV at a low rank (8 of 32 key columns) and a sparse budget: the engine keeps a
    stored prompt's exact keys (``exact_prefix_keys``), so a request from its prefix prefills
    its question exactly and its first token's log-probabilities equal the unshared request's
    to float tolerance. With the knob off the question attends to rebuilt keys: they differ."""

    def first_tokens(on: bool) -> list[tuple[dict[int, float], int]]:
        cache = ShadowKVConfig(sparse_budget=128, outlier_chunks=2, rank=8,
                               exact_prefix_keys=exact)
        llm = LLM(str(path), cache=cache, device="cpu",
                  engine=EngineConfig(cache_memory_gb=0.01, prefix_cache=on))
        out = []
        for q in QUESTIONS:
            r = llm.generate(DOC + q, SamplingParams(max_tokens=1, logprobs=20))[0]
            out.append((dict(r.logprobs[0][1]), r.metrics["cached_tokens"]))
        if on:
            assert llm.engine.cache.keeps_prefix_keys == exact
            idle(llm.engine)
        return out

    plain, shared = first_tokens(False), first_tokens(True)
    assert [c for _, c in shared] == [0, 128, 128]
    for (got, _), (want, _) in zip(shared[1:], plain[1:]):
        common = set(got) & set(want)
        gap = max(abs(got[t] - want[t]) for t in common)
        if exact:
            assert set(got) == set(want) and gap < 1e-5, gap
        else:
            assert gap > 1e-2, gap
