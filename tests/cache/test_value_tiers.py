"""ShadowKV's two value tiers: admission past a full host tier, exact mixed-tier decoding, freeing,
accounting, sizing and the flags that set it."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

from utils import cache_for  # noqa: E402

from shadowkv import LLM, DenseConfig, EngineConfig, SamplingParams, ShadowKVConfig  # noqa: E402
from shadowkv.bench.harness import max_batch  # noqa: E402
from shadowkv.cache import CacheCapacityError  # noqa: E402
from shadowkv.cache.shadow import ShadowKVCache  # noqa: E402
from shadowkv.cache.shadow_sizing import device_tier_seqs  # noqa: E402
from shadowkv.cache.store import DEVICE, HOST  # noqa: E402
from shadowkv.commands import bench as bench_cmd  # noqa: E402
from shadowkv.commands.common import add_model_args, cache_config_from_args  # noqa: E402
from shadowkv.config import ConfigError, ModelConfig  # noqa: E402
from shadowkv.kernels.gather_values.reference import gather_values as gather_ref  # noqa: E402
from shadowkv.kernels.gather_values.triton import gather_values as gather_triton  # noqa: E402

CPU = torch.device("cpu")
MAX_LEN = 512
KNOBS = {"sparse_budget": 32, "outlier_chunks": 2}


def page_bytes(num_layers: int, kv_dim: int = 32, chunk: int = 8) -> int:
    """One value page: 16 chunks of fp32 values of every KV head, over all layers."""
    return num_layers * 16 * chunk * kv_dim * 4


def tier_gb(num_pages: int, num_layers: int = 1) -> float:
    """GiB for ``num_pages`` usable pages plus the null page (exact in binary)."""
    return (num_pages + 1) * page_bytes(num_layers) / 2**30


def make_shadow(cfg: ShadowKVConfig, seqs: int = 6, memory: int = 2**24) -> ShadowKVCache:
    mcfg = ModelConfig("llama", 64, 96, 64, 1, 6, 2, 16)  # Hkv=2, D=16: kv_dim 32
    cache, _ = cache_for(mcfg, cfg, MAX_LEN, seqs, memory)
    assert isinstance(cache, ShadowKVCache)
    return cache


# admission, freeing and accounting -------------------------------------------------------------
def test_batch_is_host_plus_device_sequences_and_the_next_is_refused() -> None:
    # 200 tokens = 25 chunks = 2 pages: room for N=2 on the host tier and M=1 on the device tier.
    cfg = ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4), device_value_memory_gb=tier_gb(2))
    cache = make_shadow(cfg)
    for seq in range(3):
        assert cache.can_add(200, 8)
        cache.add_sequence(seq, 200, 8)
    assert [cache.record(s).value_tier for s in range(3)] == [HOST, HOST, DEVICE]
    assert not cache.can_add(200, 8) and cache.fits_empty(200, 8)
    with pytest.raises(CacheCapacityError) as err:
        cache.add_sequence(3, 200, 8)
    for words in ("host tier has 0 free of 4", "device tier 0 free of 2", "--host-memory-gb",
                  "--device-value-memory-gb"):
        assert words in str(err.value), words
    assert 3 not in cache.seqs and cache.can_add(60, 8), "dense fallback needs no tier"


class FakeCudart:
    """Stands in for ``torch.cuda.cudart()`` on a machine without CUDA: records (un)pinning."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.registered, self.unregistered = fail, [], []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:  # noqa: N802
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        self.registered.append((ptr, nbytes, flags))
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


def fake_pinning(cache: ShadowKVCache, monkeypatch, fail: bool) -> FakeCudart:
    """Make the host tier pinned (as on CUDA), through a fake ``cudaHostRegister``."""
    cache.store.tiers[HOST].pin = True
    cudart = FakeCudart(fail)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    return cudart


def test_the_host_tier_pins_exactly_its_size_and_unpins_when_freed(monkeypatch) -> None:
    """Pinned in place, not through PyTorch's host allocator, which rounds to a power of two."""
    import gc

    cfg = ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(5))  # 6 pages: not a power of two
    cache = make_shadow(cfg)
    cudart = fake_pinning(cache, monkeypatch, fail=False)
    cache.add_sequence(0, 200, 8)
    data = cache.store.tiers[HOST]._data
    assert cudart.registered == [(data.data_ptr(), 6 * page_bytes(1), 0)]
    del cache, data
    gc.collect()
    assert cudart.unregistered == [cudart.registered[0][0]]


def test_a_host_tier_that_cannot_be_pinned_hands_over_to_the_device_tier(monkeypatch) -> None:
    cfg = ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4), device_value_memory_gb=tier_gb(2))
    cache = make_shadow(cfg)
    fake_pinning(cache, monkeypatch, fail=True)
    with pytest.warns(RuntimeWarning, match="could not allocate .*cudaHostRegister .* failed"):
        cache.add_sequence(0, 200, 8)
    assert cache.record(0).value_tier == DEVICE
    assert cache.store.tiers[HOST].pages.capacity == 0 and cache.store.live_tiers() == (DEVICE,)
    assert not cache.can_add(200, 8), "the device tier is full and the host tier is gone"
    with pytest.raises(CacheCapacityError, match="host tier has 0 free of 0"):
        cache.add_sequence(1, 200, 8)
    cache.free_sequence(0)
    cache.add_sequence(2, 200, 8)  # no second pinning attempt, no warning
    assert cache.record(2).value_tier == DEVICE


def test_a_host_tier_that_cannot_be_pinned_and_no_device_tier_refuse(monkeypatch) -> None:
    cache = make_shadow(ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4)))
    fake_pinning(cache, monkeypatch, fail=True)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(CacheCapacityError, match="could not allocate"),
    ):
        cache.add_sequence(0, 200, 8)
    assert 0 not in cache.seqs and all(a.num_used == 0 for a in cache.allocators.values())


def test_device_tier_off_keeps_the_host_only_limit() -> None:
    cache = make_shadow(ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4)))  # CPU auto: no tier
    assert cache.store.tiers[DEVICE].pages.capacity == 0
    cache.add_sequence(0, 200, 8)
    cache.add_sequence(1, 200, 8)
    assert not cache.can_add(200, 8)


def test_fits_empty_takes_the_larger_tier() -> None:
    cfg = ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(2), device_value_memory_gb=tier_gb(3))
    cache = make_shadow(cfg)
    assert cache.fits_empty(380, 8)  # 48 chunks = 3 pages: only the device tier can hold it
    assert not cache.fits_empty(390, 8)  # 49 chunks = 4 pages: neither can
    cache.add_sequence(0, 380, 8)
    assert cache.record(0).value_tier == DEVICE


def test_free_returns_pages_to_their_tier_over_admit_free_cycles() -> None:
    cfg = ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4), device_value_memory_gb=tier_gb(4))
    cache = make_shadow(cfg)
    host, dev = (t.pages for t in cache.store.tiers)
    for seq in range(4):
        cache.add_sequence(seq, 200, 8)
    assert (host.num_free, dev.num_free) == (0, 0)
    cache.free_sequence(2)  # a device-tier sequence
    assert (host.num_free, dev.num_free) == (0, 2)
    cache.free_sequence(0)  # a host-tier one
    assert (host.num_free, dev.num_free) == (2, 2)
    cache.add_sequence(4, 200, 8)
    assert cache.record(4).value_tier == HOST and (host.num_free, dev.num_free) == (0, 2)
    cache.add_sequence(5, 200, 8)
    assert cache.record(5).value_tier == DEVICE and (host.num_free, dev.num_free) == (0, 0)
    for seq in (1, 3, 4, 5):
        cache.free_sequence(seq)
    assert (host.num_free, dev.num_free) == (4, 4) and cache.store.tiers[HOST].pages.num_used == 0
    cache.add_sequence(6, 200, 8)
    assert cache.record(6).value_tier == HOST, "host first again once it has room"


def test_memory_reports_device_tier_values_as_device_bytes() -> None:
    cfg = ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(2), device_value_memory_gb=tier_gb(2))
    cache = make_shadow(cfg)
    cache.add_sequence(0, 200, 8)
    cache.add_sequence(1, 200, 8)
    values = 2 * page_bytes(1)
    on_host, on_device = cache.memory(0), cache.memory(1)  # same layout, different tier
    assert on_host.host_bytes == values and on_host.device_bytes > 0
    assert (on_device.host_bytes, on_device.device_bytes) == (0, on_host.device_bytes + values)
    assert cache.memory() == on_host + on_device
    cache.free_sequence(0)
    assert cache.memory() == on_device


# sizing and validation ---------------------------------------------------------------------------
def test_auto_device_tier_balances_the_budget() -> None:
    # Each sequence costs 10 bytes of device state, 30 more when its values are on the device.
    assert device_tier_seqs(100, 10, 30, host_seqs=10, max_seqs=64) == 0, "the device limits"
    assert device_tier_seqs(100, 10, 30, host_seqs=2, max_seqs=64) == 2  # 2*10 + 2*40 = 100
    assert device_tier_seqs(100, 10, 30, host_seqs=0, max_seqs=64) == 2
    assert device_tier_seqs(1000, 10, 30, host_seqs=2, max_seqs=5) == 3, "max_num_seqs caps it"


def test_offload_off_puts_every_value_in_an_auto_sized_device_tier() -> None:
    cache = make_shadow(ShadowKVConfig(**KNOBS, offload_values=False), seqs=3)
    host, dev = (t.pages for t in cache.store.tiers)
    assert host.capacity == 0 and dev.capacity > 0
    for seq in range(3):
        cache.add_sequence(seq, 200, 8)
        assert cache.record(seq).value_tier == DEVICE and cache.memory(seq).host_bytes == 0


def test_config_validation_names_the_fix() -> None:
    for bad in (-0.5, float("nan")):
        with pytest.raises(ConfigError, match="device_value_memory_gb=.* must be >= 0"):
            ShadowKVConfig(device_value_memory_gb=bad)
    with pytest.raises(ConfigError, match="host_memory_gb=-1 must be >= 0"):
        ShadowKVConfig(host_memory_gb=-1)
    with pytest.raises(ConfigError, match="drop one"):
        ShadowKVConfig(offload_values=False, host_memory_gb=1)
    with pytest.raises(ConfigError, match="gives it no memory"):
        ShadowKVConfig(offload_values=False, device_value_memory_gb=0)
    with pytest.raises(ConfigError, match="device_value_memory_gb=.*lower it or raise"):
        whole_budget = 2**24 / 2**30
        make_shadow(ShadowKVConfig(**KNOBS, device_value_memory_gb=whole_budget))


def test_cli_flags_reach_the_config() -> None:
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--cache", "shadowkv", "--device-value-memory-gb", "1.5"])
    assert cache_config_from_args(args).device_value_memory_gb == 1.5
    b = argparse.ArgumentParser()
    bench_cmd.add_arguments(b)
    args = b.parse_args(["--arch", "tiny", "--device-value-memory-gb", "0.25"])
    cfg = bench_cmd.config_from_args(args)
    assert cfg.caches[cfg.methods.index("shadowkv")].device_value_memory_gb == 0.25


def test_bench_batch_search_counts_both_tiers() -> None:
    host_only = make_shadow(ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4)), seqs=8)
    both = make_shadow(
        ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4), device_value_memory_gb=tier_gb(6)),
        seqs=8,
    )
    assert (max_batch(host_only, 200, 3, 8), max_batch(both, 200, 3, 8)) == (2, 5)


# gather per tier -------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [gather_ref, gather_triton], ids=["reference", "triton"])
def test_per_tier_gathers_equal_one_gather_from_a_joint_store(op) -> None:
    """Sequences 0 and 2 read the host tier, 1 the device tier (the cache's masked calls)."""
    gen = torch.Generator().manual_seed(3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, Hkv, K, C, D, Pc, S = 3, 2, 5, 8, 64, 4, 16
    joint = torch.randn(8, Pc, Hkv, C * D, generator=gen)  # pages 0-3 host, 4-7 device
    host, device = joint[:4].clone(), joint[4:].to(dev)
    if dev == "cuda":
        host = host.pin_memory()
    table = torch.tensor([[1, 2], [1, 3], [3, 2]], dtype=torch.int32)  # tier-local pages
    on_device = torch.tensor([False, True, False])
    joint_table = table + 4 * on_device[:, None].int()
    perms = [torch.randperm(2 * Pc, generator=gen)[:K] for _ in range(B * Hkv)]
    slot_ids = torch.stack(perms).view(B, Hkv, K).int()  # chunks of a sequence's 2 pages
    miss = torch.rand(B, Hkv, K, generator=gen) < 0.7
    dst = torch.randperm(8 * S, generator=gen)[: B * K * C].view(B, K * C)
    v_cache = torch.full((8, S, Hkv, D), float("nan"))
    want = v_cache.clone()
    gather_ref(want, joint, joint_table, slot_ids, miss, dst)
    got = v_cache.to(dev)
    args = [t.to(dev) for t in (table, slot_ids, miss, dst, on_device)]
    for store, mask in ((host, ~args[4]), (device, args[4])):
        op(got, store, args[0], args[1], args[2] & mask[:, None, None], args[3])
    got = got.cpu()
    assert torch.equal(got.isnan(), want.isnan()), "written rows differ from the missed rows"
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


# decoding with sequences on both tiers ----------------------------------------------------------
def tier_llm(path, cfg) -> LLM:
    engine = EngineConfig(max_num_seqs=4, max_model_len=MAX_LEN)
    return LLM(str(path), cache=cfg, engine=engine, device="cpu")


@pytest.mark.parametrize(
    "lengths,budget,rank",
    [
        pytest.param((141, 137, 143, 136, 139), 88, 1.0, id="full-budget-full-rank"),
        pytest.param((173, 250, 200, 230, 190), 32, 0.5, id="sparse-rank-half"),
    ],
)
def test_mixed_tier_batch_decodes_like_each_sequence_alone(
    tiny_checkpoint, lengths, budget, rank
) -> None:
    """Prompts 0, 1 go to the host tier, 2, 3 to the device tier; 0 stops early and 4 takes its
    host pages while 2 and 3 still decode, so both tiers serve first (all-miss) steps."""
    path = tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=16)  # 2 layers
    two_seqs = (2 * 2 + 1) * page_bytes(2) / 2**30  # every prompt here takes 2 pages
    cfg = ShadowKVConfig(
        sparse_budget=budget, outlier_chunks=2, rank=rank,
        host_memory_gb=two_seqs, device_value_memory_gb=two_seqs,
    )
    llm = tier_llm(path, cfg)
    gen = torch.Generator().manual_seed(len(lengths) + budget)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (6, 12, 12, 12, 10)]
    batched = llm.generate(prompts, params)
    host = [r.cache_memory["host_bytes"] for r in batched]
    assert host == [2 * page_bytes(2)] * 2 + [0, 0] + [2 * page_bytes(2)], host
    alone = [llm.generate(p, q)[0] for p, q in zip(prompts, params)]
    assert all(r.cache_memory["host_bytes"] > 0 for r in alone), "alone, each fits the host tier"
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    if rank == 1.0:
        want = tier_llm(path, DenseConfig()).generate(prompts, params)
        assert [r.token_ids for r in batched] == [r.token_ids for r in want]


def test_gather_refuses_a_store_on_a_third_device() -> None:
    from shadowkv.kernels.gather_values import gather_values

    store = torch.empty(2, 4, 2, 8 * 16, device="meta")
    v_cache = torch.zeros(2, 16, 2, 16)
    ids = torch.zeros(1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="host memory or on v_cache's device"):
        gather_values(v_cache, store, ids[0], ids, ids.bool(), torch.zeros(1, 8, dtype=torch.long))


def test_value_writes_copy_runs_of_pages_and_land_in_chunk_order() -> None:
    from shadowkv.cache.store import ValueLayout, ValueTier, page_runs

    assert page_runs([5, 6, 2, 3, 4, 9], 16) == [(5, 2, 0), (2, 3, 32), (9, 1, 80)]
    assert page_runs([], 16) == []
    Hkv, D, C, Pc = 2, 16, 8, 4
    layout = ValueLayout(1, Hkv, D, C, Pc, torch.float32)
    tier = ValueTier(HOST, layout, 12 * layout.page_bytes, CPU, pin=False, fix="-")
    tier.allocate()
    pages = [7, 8, 2, 10]  # 3 runs; 4 pages of 4 chunks hold 16 chunks
    T = 15 * C + 3  # the last chunk is partial: zero-padded
    values = torch.randn(T, Hkv, D)
    tier.write(0, pages, values)
    store = tier.layer(0)  # [pages, Pc, Hkv, C * D]
    chunks = torch.cat([store[p] for p in pages])[: 16]  # [16, Hkv, C * D] in chunk order
    got = chunks.view(16, Hkv, C, D).transpose(1, 2).reshape(16 * C, Hkv, D)
    torch.testing.assert_close(got[:T], values, rtol=0, atol=0)
    assert got[T:].abs().sum() == 0


def test_a_batch_search_allocates_no_host_tier() -> None:
    cache = make_shadow(ShadowKVConfig(**KNOBS, host_memory_gb=tier_gb(4)))
    assert max_batch(cache, 200, 8, 6) == 2  # 2 pages each, 4 usable pages
    assert cache.store.tiers[HOST]._data is None and cache.store.live_tiers() == ()
    cache.add_sequence(0, 200, 8)  # a real admission allocates it
    assert cache.store.live_tiers() == (HOST,)
