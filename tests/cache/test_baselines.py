"""Quest, Loki, StreamingLLM and oracle top-k: exact at full budget, within budget when sparse."""

from __future__ import annotations

import functools

import pytest
import torch
from utils import assert_close_verbose, cache_for, run_model

from shadowkv.cache.loki import principal_basis
from shadowkv.cache.methods import method_config
from shadowkv.cache.quest import QuestCache
from shadowkv.cache.sparse_base import SparseCache
from shadowkv.config import EngineConfig
from shadowkv.models.loader import load_model

METHODS = ["quest", "loki", "streaming", "oracle"]
CPU = torch.device("cpu")
MAX_LEN = 512


@functools.cache
def _load(checkpoint, device=CPU, dtype=torch.float32):
    return load_model(checkpoint, device, dtype)


@functools.cache
def _dense_logits(checkpoint, lens: tuple[int, ...], steps: int) -> torch.Tensor:
    return Driver(checkpoint, "dense").run(lens, steps)


class Driver:
    """Prefill prompts one by one, then batched decode steps of fixed tokens, recording logits."""

    def __init__(
        self, checkpoint, method: str, device=CPU, dtype=torch.float32, **cache_kw
    ) -> None:
        self.cfg, self.model = _load(checkpoint, device, dtype)
        self.device = device
        cache_cfg = method_config(method, **cache_kw)
        self.cache, self.rope = cache_for(self.cfg, cache_cfg, MAX_LEN, 4, 2**24, dtype, device)

    def run(self, prompt_lens: tuple[int, ...], steps: int, seed: int = 0) -> torch.Tensor:
        """Logits ``[steps + 1, B, vocab]``: the prefill's last token, then each decode step."""
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(3, self.cfg.vocab_size, (n,), generator=gen) for n in prompt_lens]
        dev = self.device
        first = []
        for sid, ids in enumerate(prompts):
            self.cache.add_sequence(sid, len(ids), steps)
            self.cache.begin_prefill(sid, len(ids))
            logits = run_model(
                self.model, ids.to(dev), torch.arange(len(ids), device=dev), self.rope,
                self.cache, "prefill", logits_index=torch.tensor([len(ids) - 1], device=dev),
            )
            self.cache.end_prefill()
            first.append(logits[0])
        out = [torch.stack(first)]
        seqs = list(range(len(prompts)))
        # Fed tokens are fixed, not sampled, so a near-tie cannot send two methods down two paths.
        fed = torch.randint(3, self.cfg.vocab_size, (steps, len(prompts)), generator=gen).to(dev)
        for tokens in fed:
            self.cache.begin_decode(seqs)
            positions = torch.tensor([self.cache.length(s) for s in seqs], device=dev)
            logits = run_model(self.model, tokens, positions, self.rope, self.cache, "decode")
            self.cache.end_decode()
            out.append(logits)
        return torch.stack(out)


def capture_selection(cache: SparseCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record every ``select`` result of ``cache`` (one per layer per decode step)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    inner = cache.select

    def wrapped(layer, q):
        pos, valid = inner(layer, q)
        seen.append((pos.clone(), valid.clone()))
        return pos, valid

    cache.select = wrapped  # type: ignore[method-assign]
    return seen


SHAPES = [
    pytest.param("llama", dict(num_heads=6, num_kv_heads=2, head_dim=16), id="llama-G3-D16"),
    pytest.param("qwen2", dict(num_heads=4, num_kv_heads=4, head_dim=16), id="qwen2-G1-D16"),
    pytest.param("mistral", dict(num_heads=8, num_kv_heads=2, head_dim=32), id="mistral-G4-D32"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family,shape", SHAPES)
def test_full_budget_equals_dense(tiny_checkpoint, family, shape, method):
    ckpt = tiny_checkpoint(family, **shape)
    lens = (141, 67)  # odd, unequal: exercises padding of the batch and partial pages
    dense = _dense_logits(ckpt, lens, steps=3)
    sparse = Driver(ckpt, method, sparse_budget=256).run(lens, steps=3)
    assert_close_verbose(sparse, dense, atol=1e-4, rtol=1e-4, what=f"{method} logits")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_equals_dense_cuda(tiny_checkpoint, method, dtype):
    ckpt = tiny_checkpoint("llama", num_heads=8, num_kv_heads=2, head_dim=64)
    cuda = torch.device("cuda")
    lens = (301, 150)
    dense = Driver(ckpt, "dense", cuda, dtype).run(lens, steps=4)
    sparse = Driver(ckpt, method, cuda, dtype, sparse_budget=512).run(lens, steps=4)
    err = ((sparse - dense).norm() / dense.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"{method}: relative error {err:.3g}"
    small = Driver(ckpt, method, cuda, dtype, sparse_budget=32).run(lens, steps=2)
    assert torch.isfinite(small).all()


@pytest.mark.parametrize("method", METHODS)
def test_small_budget_changes_logits(tiny_checkpoint, method):
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    dense = _dense_logits(ckpt, (200,), steps=2)
    sparse = Driver(ckpt, method, sparse_budget=16, local_chunks=1).run((200,), steps=2)
    assert torch.equal(sparse[0], dense[0]), "prefill must stay exact"
    assert (sparse[1:] - dense[1:]).abs().max() > 1e-3, "a 16-token budget cannot equal dense"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [32, 0.25], ids=["tokens32", "frac0.25"])
def test_respects_budget(tiny_checkpoint, method, budget):
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    drv = Driver(ckpt, method, sparse_budget=budget)
    seen = capture_selection(drv.cache)
    lens = (203, 150)
    drv.run(lens, steps=3)
    cfg = drv.cache.cfg
    assert len(seen) == 3 * drv.cfg.num_layers
    for pos, valid in seen:
        for b, n in enumerate(lens):
            allowed = cfg.budget_tokens(n)
            selectable = n - drv.cache.local_tokens(n)
            counts = valid[b].sum(-1)  # [Hkv] selected prompt rows per KV head
            unit = cfg.page_size if method == "quest" else 1
            assert (counts <= allowed).all(), f"{method}: {counts.tolist()} rows > budget {allowed}"
            assert (counts >= allowed - unit).all(), f"{method} under-uses: {counts.tolist()}"
            chosen = pos[b][valid[b]]
            assert (chosen >= 0).all() and (chosen < selectable).all(), "selection left the prefix"
            for h in range(valid.shape[1]):
                rows = pos[b, h][valid[b, h]]
                assert rows.unique().numel() == rows.numel(), "a row was selected twice"


@pytest.mark.parametrize("method", METHODS)
def test_attention_equals_masked_dense(tiny_checkpoint, method):
    """The sparse output equals float64 dense attention with every unselected row masked out."""
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    drv = Driver(ckpt, method, sparse_budget=24)
    cache = drv.cache
    calls = []
    inner = cache.attend

    def wrapped(layer, q, pos, valid):
        out = inner(layer, q, pos, valid)
        calls.append((layer, q.clone(), pos.clone(), valid.clone(), out.clone()))
        return out

    cache.attend = wrapped  # type: ignore[method-assign]
    lens = (97, 130)
    drv.run(lens, steps=2)
    Hkv, D = drv.cfg.num_kv_heads, drv.cfg.head_dim
    for layer, q, pos, valid, out in calls[-drv.cfg.num_layers :]:
        for b, sid in enumerate(range(len(lens))):
            length = cache.length(sid)  # includes the token of this (last) step
            slots = cache._slots(sid, 0, length)
            k = cache.k_cache[layer].view(-1, Hkv, D)[slots].double()  # [L, Hkv, D]
            v = cache.v_cache[layer].view(-1, Hkv, D)[slots].double()
            mask = torch.zeros(Hkv, length, dtype=torch.bool)
            for h in range(Hkv):
                mask[h, pos[b, h][valid[b, h]]] = True
            G = q.shape[1] // Hkv
            qb = q[b].double().view(Hkv, G, D)
            scores = torch.einsum("hgd,lhd->hgl", qb, k) * cache.scale
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
            ref = torch.einsum("hgl,lhd->hgd", scores.softmax(-1), v).reshape(-1, D)
            assert_close_verbose(out[b].double(), ref, atol=1e-5, rtol=1e-5, what=f"{method} b{b}")
            prompt = lens[b]
            local = cache.local_tokens(prompt)
            assert mask[:, prompt - local :].all(), "local window and generated rows are attended"


def test_quest_bounds_are_true_bounds(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    drv = Driver(ckpt, "quest", sparse_budget=32)
    drv.run((77,), steps=1)
    cache = drv.cache
    assert isinstance(cache, QuestCache)
    Hkv, D, S = drv.cfg.num_kv_heads, drv.cfg.head_dim, cache.cfg.page_size
    slots = cache._slots(0, 0, 77)
    blocks = cache.block_tables[cache.seqs[0].row].long()
    for layer in range(drv.cfg.num_layers):
        k = cache.k_cache[layer].view(-1, Hkv, D)[slots]  # [77, Hkv, D]
        for page in range(-(-77 // S)):
            keys = k[page * S : (page + 1) * S]
            lo, hi = cache.page_min[layer][blocks[page]], cache.page_max[layer][blocks[page]]
            assert torch.equal(lo, keys.amin(0)) and torch.equal(hi, keys.amax(0)), f"page {page}"
            q = torch.randn(50, Hkv, D, dtype=torch.float64)
            bound = torch.maximum(q * lo.double(), q * hi.double()).sum(-1)  # [50, Hkv]
            dots = torch.einsum("qhd,thd->qth", q, keys.double())
            assert (dots <= bound[:, None, :] + 1e-9).all(), f"bound violated on page {page}"


def test_streaming_keeps_sinks_and_recent(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    drv = Driver(ckpt, "streaming", sparse_budget=32, sink_tokens=4)
    seen = capture_selection(drv.cache)
    drv.run((150,), steps=1)
    pos, valid = seen[0]
    selectable = 150 - drv.cache.local_tokens(150)
    expected = list(range(4)) + list(range(selectable - 28, selectable))
    for h in range(pos.shape[1]):
        assert sorted(pos[0, h][valid[0, h]].tolist()) == expected


def test_oracle_picks_the_true_top_k(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    drv = Driver(ckpt, "oracle", sparse_budget=16)
    cache = drv.cache
    seen = capture_selection(cache)
    queries = []
    inner = cache.select

    def record(layer, q):
        queries.append((layer, q.clone()))
        return inner(layer, q)

    cache.select = record  # type: ignore[method-assign]
    drv.run((120,), steps=1)
    Hkv, D = drv.cfg.num_kv_heads, drv.cfg.head_dim
    selectable = 120 - cache.local_tokens(120)
    slots = cache._slots(0, 0, selectable)
    for (layer, q), (pos, valid) in zip(queries, seen):
        k = cache.k_cache[layer].view(-1, Hkv, D)[slots].double()
        G = q.shape[1] // Hkv
        probs = (torch.einsum("hgd,thd->hgt", q[0].double().view(Hkv, G, D), k) * cache.scale)
        best = probs.softmax(-1).amax(1).topk(16, dim=-1).indices  # [Hkv, 16]
        for h in range(Hkv):
            assert set(pos[0, h][valid[0, h]].tolist()) == set(best[h].tolist()), f"layer {layer}"


def test_loki_at_full_rank_selects_like_oracle(tiny_checkpoint):
    """With every principal direction kept, (qW).(kW) = q.k, so Loki must pick the oracle's rows."""
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    picks = {}
    for method in ("loki", "oracle"):
        drv = Driver(ckpt, method, sparse_budget=24, loki_rank=1.0)
        seen = capture_selection(drv.cache)
        drv.run((160, 90), steps=2)
        picks[method] = [
            [set(p[b, h][v[b, h]].tolist()) for b in range(2) for h in range(p.shape[1])]
            for p, v in seen
        ]
    assert picks["loki"] == picks["oracle"]


def test_loki_basis_is_orthonormal_and_ordered():
    k = torch.randn(300, 3, 16) * torch.linspace(3, 0.1, 16)  # energy falls along d
    basis = principal_basis(k, 4)  # [3, 16, 4]
    eye = torch.eye(4).expand(3, 4, 4)
    assert_close_verbose(basis.transpose(1, 2) @ basis, eye, atol=1e-5, rtol=0, what="W^T W")
    energy = torch.einsum("thd,hdr->thr", k, basis).pow(2).sum(0)  # [3, 4]
    assert (energy[:, :-1] >= energy[:, 1:]).all(), "directions must come in decreasing energy"


def test_metadata_counts_in_memory(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    used = {}
    for method in ("dense", "quest", "loki", "oracle"):
        drv = Driver(ckpt, method, sparse_budget=32)
        drv.run((100,), steps=1)
        used[method] = drv.cache.memory(0).device_bytes
    assert used["oracle"] == used["dense"], "oracle keeps nothing besides the dense pool"
    # Quest: min and max per page = 2/page_size of the keys; Loki: loki_rank of the keys.
    assert used["quest"] == pytest.approx(used["dense"] * (1 + 1 / 16))
    assert used["loki"] == pytest.approx(used["dense"] * (1 + 0.25 / 2))


def test_llm_generates_like_dense_at_full_budget(tiny_checkpoint):
    """Through the engine (continuous batching, two prompts): identical greedy tokens."""
    from shadowkv import LLM, SamplingParams

    ckpt = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)
    prompts = [" ".join(f"w{3 + (i * 7) % 500}" for i in range(n)) for n in (90, 61)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = EngineConfig(max_model_len=MAX_LEN, cache_memory_gb=0.01)
    ref = [r.token_ids for r in LLM(ckpt, engine=engine, device="cpu").generate(prompts, params)]
    for method in ("quest", "loki"):  # the two with prefill metadata; selection is shared
        cache = method_config(method, sparse_budget=1024)
        llm = LLM(ckpt, cache=cache, engine=engine, device="cpu")
        got = [r.token_ids for r in llm.generate(prompts, params)]
        assert got == ref, method
