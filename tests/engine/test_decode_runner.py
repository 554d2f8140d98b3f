"""The fixed-shape decode step that CUDA graphs capture, run without capture on the CPU.

``decode_mode="static"`` pads each batch to a size in ``batch_sizes`` and rounds the cache's plan
widths up to buckets; everything a CUDA graph would replay runs, just not captured. These tests
check that padding and bucketing change nothing: tokens, hit rates and memory equal the eager
path's, with sequences joining and leaving mid-run, per-request options and both value tiers.
The capture itself needs a GPU (tests/cache/test_cuda_paths.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shadowkv import LLM, CacheOptions, DenseConfig, EngineConfig, SamplingParams, method_config
from shadowkv.config import ConfigError
from shadowkv.engine.decode_runner import batch_sizes, resolve_mode

# Three long prompts (sparse under a 32-token budget) and a 40-token one that ShadowKV serves
# dense; different max_tokens make the batch shrink 4 -> 3 -> 2 -> 1 while it runs.
PROMPTS = [
    [(k * i) % 90 + 3 for i in range(n)] for k, n in ((7, 300), (11, 211), (13, 157), (5, 40))
]
MAX_TOKENS = [12, 9, 5, 7]
SHADOW = dict(method="shadowkv", sparse_budget=32, rank=0.5, outlier_chunks=2)


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", num_heads=6, num_kv_heads=2, head_dim=64, vocab_size=96)


def make_llm(path: Path, mode: str, cache: dict | None = None, **engine) -> LLM:
    cfg = method_config(**cache) if cache else DenseConfig()
    eng = EngineConfig(cache_memory_gb=0.05, decode_mode=mode, **engine)
    return LLM(str(path), device="cpu", cache=cfg, engine=eng)


def run(llm: LLM, prompts=PROMPTS, max_tokens=MAX_TOKENS, options=None, late: int = 0):
    """Greedy tokens per prompt; the last ``late`` prompts join after three steps."""
    engine = llm.engine
    opts = options or [None] * len(prompts)
    early = len(prompts) - late
    reqs = [
        engine.add_request(p, SamplingParams(max_tokens=m), cache_options=o)
        for p, m, o in list(zip(prompts, max_tokens, opts))[:early]
    ]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == 3:
            reqs += [
                engine.add_request(p, SamplingParams(max_tokens=m), cache_options=o)
                for p, m, o in list(zip(prompts, max_tokens, opts))[early:]
            ]
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("cache", [None, SHADOW], ids=["dense", "shadowkv"])
def test_static_steps_equal_eager_as_the_batch_changes(path: Path, cache) -> None:
    eager_llm = make_llm(path, "eager", cache)
    eager = run(eager_llm, late=1)
    assert all(len(set(t)) > 1 for t in eager), "constant outputs would make this vacuous"
    static_llm = make_llm(path, "static", cache)
    assert run(static_llm, late=1) == eager
    runner = static_llm.engine.runner
    sizes = {key[0] for key in runner._steps}
    assert sizes >= {1, 2, 4}, f"the run should pad to several batch sizes, saw {sizes}"
    if cache is SHADOW:
        hits = eager_llm.engine.cache.hit_rate(), static_llm.engine.cache.hit_rate()
        assert hits[0] == pytest.approx(hits[1], nan_ok=True)
        assert not any(map(torch.isnan, torch.tensor(hits[1])))


def test_static_steps_equal_eager_with_the_triton_kernels(path: Path, monkeypatch) -> None:
    """The same, through the Triton kernels (interpreted on a CPU): what a CUDA graph replays
    on a GPU, padded views and bucketed tables included, short of the capture itself. ShadowKV
    only (its step runs every kernel the dense step does, decode_attention over padded block
    tables included; the interpreter makes each case cost ~20 s)."""
    cache = SHADOW
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    # Shorter prompts than the others here (still sparse under the 32-token budget): the
    # interpreter runs the prefills' kernels one program per token, which dominates the time.
    prompts = [[(k * i) % 90 + 3 for i in range(n)] for k, n in ((7, 131), (11, 104), (13, 97))]
    eager = run(make_llm(path, "eager", cache), prompts, [6, 4, 5], late=1)
    assert run(make_llm(path, "static", cache), prompts, [6, 4, 5], late=1) == eager


def test_widths_hold_while_the_batch_does(path: Path) -> None:
    """One padded size and one plan key for a whole run of a fixed batch: a graph would be
    captured once and replayed every step."""
    engine = make_llm(path, "static", SHADOW).engine
    for p in PROMPTS[:3]:
        engine.add_request(p, SamplingParams(max_tokens=16, ignore_eos=True))
    keys = []  # the step key each decode step of the full batch used
    while engine.has_unfinished():
        full = len(engine.running) == 3  # admission grows it 1 -> 2 -> 3, finishing shrinks it
        engine.step()
        if full and engine.last_step == "decode":
            keys.append(next(reversed(engine.runner._steps)))  # the most recently used
    assert len(keys) >= 10 and set(keys) == {keys[0]} and keys[0][0] == 4


def test_static_request_options_equal_eager(path: Path) -> None:
    opts = [CacheOptions(exact=True), CacheOptions(sparse_budget=16), None, None]
    assert run(make_llm(path, "static", SHADOW), options=opts) == run(
        make_llm(path, "eager", SHADOW), options=opts
    )


def test_static_steps_over_both_value_tiers(path: Path) -> None:
    from shadowkv.cache.store import DEVICE, HOST

    # Host tier: room for 3 value pages of 16 chunks (2 layers x 16 x 2 heads x 8 x 64 fp32 =
    # 128 KiB each), so the 300-token prompt (3 pages) fills it and the others go to the device.
    mixed = dict(SHADOW, host_memory_gb=4 * 2**17 / 2**30, device_value_memory_gb=0.01)
    llm = make_llm(path, "static", mixed)
    tokens = run(llm, PROMPTS[:3], MAX_TOKENS[:3])
    assert llm.engine.cache.store.live_tiers() == (HOST, DEVICE)
    assert tokens == run(make_llm(path, "eager", mixed), PROMPTS[:3], MAX_TOKENS[:3])


@pytest.mark.parametrize("cache", [None, SHADOW], ids=["dense", "shadowkv"])
def test_padding_touches_no_sequence(path: Path, cache) -> None:
    """Padded steps leave every sequence's cached rows exactly as eager steps do."""
    eager, static = make_llm(path, "eager", cache), make_llm(path, "static", cache)
    for llm in (eager, static):
        for p in PROMPTS[:3]:  # 3 sequences: static pads to 4
            llm.engine.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True))
        for _ in range(5):  # the 3 prefills in one step, then 4 padded decode steps
            llm.engine.step()
        assert len(llm.engine.running) == 3
    a, b = eager.engine.cache, static.engine.cache
    if cache is None:
        pools = ((a.k_cache, b.k_cache), (a.v_cache, b.v_cache))
    else:
        pools = ((a.k_buf, b.k_buf), (a.v_buf, b.v_buf))
    owned = [{s: r.pages["blocks"] for s, r in c.seqs.items()} for c in (a, b)]
    assert owned[0] == owned[1]
    S = pools[0][0][0].shape[1]
    if cache is None:  # rows written so far (the dense pool is not zeroed at admission)
        held = [
            blocks[i // S] * S + i % S
            for s, blocks in owned[0].items()
            for i in range(a.length(s))
        ]
    else:  # the ShadowKV buffer is zeroed at admission: all of it compares
        held = [b * S + i for blocks in owned[0].values() for b in blocks for i in range(S)]
    for pa, pb in pools:
        for layer in range(len(pa)):
            flat_a, flat_b = (p[layer].reshape(-1, *p[layer].shape[2:]) for p in (pa, pb))
            # Float noise from other batch shapes is ~1e-6; a padding write would be O(1).
            torch.testing.assert_close(flat_b[held], flat_a[held], rtol=0, atol=1e-4)
    if cache is not None:
        rows = [r.row for r in a.seqs.values()]
        for layer in range(len(a.selection)):
            assert torch.equal(a.selection[layer][rows], b.selection[layer][rows])


def test_batch_sizes() -> None:
    assert batch_sizes(1) == [1]
    assert batch_sizes(3) == [1, 2, 3]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def test_modes_that_cannot_run_say_why(path: Path) -> None:
    llm = make_llm(path, "eager", dict(method="quest", sparse_budget=32))
    cpu = torch.device("cpu")
    assert resolve_mode("auto", llm.engine.cache, cpu) == "eager"
    with pytest.raises(ConfigError, match="fixed-shape decode step"):
        resolve_mode("static", llm.engine.cache, cpu)
    dense = make_llm(path, "eager")
    assert resolve_mode("auto", dense.engine.cache, cpu) == "eager"
    with pytest.raises(ConfigError, match="CUDA graphs"):
        resolve_mode("graph", dense.engine.cache, cpu)
    with pytest.raises(ConfigError, match="decode_mode"):
        EngineConfig(decode_mode="graphs")


@pytest.mark.parametrize("cache", [None, SHADOW], ids=["dense", "shadowkv"])
def test_the_static_step_reads_nothing_back_from_the_device(path: Path, cache, monkeypatch) -> None:
    """Outside the kernel ops, the fixed-shape step (what a graph captures) must not read a
    tensor's value on the host: on CUDA that is a sync, which capture forbids, and a value read
    at capture time would be frozen into every replay. The kernel ops are exempt here: their
    CPU references read lengths, their Triton versions (the CUDA path) do not."""
    import shadowkv.cache.dense as dense_mod
    import shadowkv.cache.shadow as shadow_mod
    import shadowkv.cache.shadow_drive as selection_mod
    from shadowkv.engine.decode_runner import DecodeRunner

    state = {"in_step": False, "in_kernel": False, "reads": []}

    def guard(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if state["in_step"] and not state["in_kernel"]:
                state["reads"].append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    reads = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu")
    for name in reads:
        guard(name)

    def exempt(fn):
        def run(*args, **kwargs):
            state["in_kernel"] = True
            try:
                return fn(*args, **kwargs)
            finally:
                state["in_kernel"] = False

        return run

    for mod, names in (
        (dense_mod, ["decode_attention"]),
        (shadow_mod, [
            "decode_attention", "gather_values", "reconstruct_keys", "select_chunks_inplace",
        ]),
        (selection_mod, ["score_landmarks"]),
    ):
        for name in names:
            monkeypatch.setattr(mod, name, exempt(getattr(mod, name)))
    forward = DecodeRunner._forward

    def watched(self, *args):
        state["in_step"] = True
        try:
            return forward(self, *args)
        finally:
            state["in_step"] = False

    monkeypatch.setattr(DecodeRunner, "_forward", watched)
    tokens = run(make_llm(path, "static", cache), PROMPTS[:3], [6, 6, 6])
    assert all(len(t) == 6 for t in tokens)
    assert state["reads"] == []
    # The guard itself is live: a read inside the step is recorded.
    state["in_step"] = True
    torch.tensor([3]).item()
    assert state["reads"] == ["item"]


def test_a_failed_capture_falls_back_to_eager_under_auto(path: Path, monkeypatch) -> None:
    """If capturing fails (an op that cannot be captured, no memory for the graph), ``auto``
    warns and decodes eagerly, losing no request; an explicit ``graph`` raises."""
    from shadowkv.engine.decode_runner import DecodeRunner

    def broken(self, step, size, widths):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeRunner, "_capture", broken)
    want = run(make_llm(path, "eager", SHADOW), PROMPTS[:2], [6, 6])
    llm = make_llm(path, "auto", SHADOW)
    llm.engine.runner.mode = "graph"  # as resolved on CUDA
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = run(llm, PROMPTS[:2], [6, 6])
    assert got == want and llm.engine.runner.mode == "eager"
    strict = make_llm(path, "auto", SHADOW)
    strict.engine.runner.mode, strict.engine.runner.requested = "graph", "graph"
    with pytest.raises(RuntimeError, match="stream is capturing"):
        run(strict, PROMPTS[:2], [6, 6])


def test_cli_flags_reach_the_configs() -> None:
    import argparse

    from shadowkv.commands import bench as bench_cmd
    from shadowkv.commands.common import add_model_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert engine_config_from_args(p.parse_args([])).decode_mode == "auto"
    assert engine_config_from_args(p.parse_args(["--decode-mode", "eager"])).decode_mode == "eager"
    b = argparse.ArgumentParser()
    bench_cmd.add_arguments(b)
    cfg = bench_cmd.config_from_args(
        b.parse_args(["--arch", "tiny", "--decode-mode", "static", "--prefill", "synthetic"])
    )
    assert (cfg.engine.decode_mode, cfg.prefill) == ("static", "synthetic")


def test_results_say_how_decode_ran(path: Path) -> None:
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for mode in ("static", "eager"):
        out = make_llm(path, mode).generate(PROMPTS[:1], params)[0]
        assert out.metrics["decode_mode"] == mode
