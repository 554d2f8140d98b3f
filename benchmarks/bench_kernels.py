"""Kernel benchmarks: correctness gate, then timings of each Triton op against its baselines.

For every op at Llama-3.1-8B attention shapes (32 query / 8 KV heads, d=128, bf16): compare the
Triton kernel with the PyTorch reference (``max |out - ref| / max |ref|`` over fp32 upcasts, or
exact equality for index and copy ops), then, only when that passes, time both with
``triton.testing.do_bench`` (median; it flushes L2 between runs) and report time, GB/s over the
fewest bytes the op must move, and that as a fraction of the measured ceiling (device copy, or
pinned host->device copy for the value fetch). Writes ``kernels.json`` and ``kernels.md`` under
``--out`` with the device name and versions, and prints the table last.

    python3 benchmarks/bench_kernels.py --out gpu_out            # on a CUDA machine
    .venv/bin/python benchmarks/bench_kernels.py --smoke --out /tmp/k  # CPU interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from shadowkv.kernels.decode_attention import reference as da_ref  # noqa: E402
from shadowkv.kernels.fp8 import quantize_fp8  # noqa: E402
from shadowkv.kernels.gather_values import reference as gv_ref  # noqa: E402
from shadowkv.kernels.reconstruct_keys import reference as rk_ref  # noqa: E402
from shadowkv.kernels.score_landmarks import reference as sl_ref  # noqa: E402
from shadowkv.kernels.select_chunks import reference as sc_ref  # noqa: E402

H, HKV, D, C, R = 32, 8, 128, 8, 160  # Llama-3.1-8B attention; ShadowKV chunk 8, rank 160
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


class Bench:
    def __init__(
        self, device: str, dtype: torch.dtype, smoke: bool, check_only: bool = False
    ) -> None:
        self.dev, self.dtype, self.smoke, self.check_only = device, dtype, smoke, check_only
        self.rows: list[dict[str, Any]] = []
        self.ceiling: dict[str, float] = {}
        self.live: Path | None = None  # rows.jsonl: each row written as it is measured

    def add(self, row: dict[str, Any]) -> None:
        """Keep a row, append it to ``live`` and print it: a run cut short keeps what it did."""
        self.rows.append(row)
        if self.live is not None:
            with open(self.live, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        if self.smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def record(
        self,
        op: str,
        case: str,
        impl: str,
        fn: Callable[[], Any],
        nbytes: int,
        ceiling: str = "copy",
        **extra: Any,
    ) -> None:
        if self.check_only:
            return
        try:
            ms = self.time_ms(fn)
        except Exception as exc:  # keep going: one failing impl must not hide the rest
            self.add(dict(op=op, case=case, impl=impl, error=repr(exc)[:300]))
            return
        gbps = nbytes / ms / 1e6
        row = dict(op=op, case=case, impl=impl, ms=round(ms, 4), gbps=round(gbps, 1), **extra)
        if self.ceiling.get(ceiling):
            row["of_ceiling"] = round(gbps / self.ceiling[ceiling], 3)
        self.add(row)

    def gate(self, op: str, case: str, ok: bool, err: float | None) -> bool:
        self.add(dict(op=op, case=case, impl="check", ok=bool(ok), rel_err=err))
        return ok


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(out)):
        return float("inf")
    return ((out[fin] - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-30)).item()


def measure_ceilings(b: Bench) -> None:
    n = (64 << 20) if b.smoke else (1 << 30)
    x = torch.randn(n // 4, device=b.dev)
    y = torch.empty_like(x)
    b.ceiling["copy"] = 2 * n / b.time_ms(lambda: y.copy_(x)) / 1e6  # bytes read + written
    if b.dev == "cuda":
        h = torch.randn(n // 4).pin_memory()
        b.ceiling["h2d"] = n / b.time_ms(lambda: y.copy_(h, non_blocking=True)) / 1e6


def bench_decode_attention(b: Bench, cases: list[tuple[int, int]]) -> None:
    from shadowkv.kernels.decode_attention.triton import decode_attention as tri

    S = 16
    for B, L in cases:
        case = f"B{B}-L{L}"
        nb = -(-L // S)
        q = torch.randn(B, H, D, device=b.dev, dtype=b.dtype)
        k = torch.randn(B * nb, S, HKV, D, device=b.dev, dtype=b.dtype)
        v = torch.randn_like(k)
        table = torch.randperm(B * nb, device=b.dev).view(B, nb).int()
        lens = (L - torch.randint(0, S, (B,), device=b.dev)).int()
        args = (q, k, v, table, lens, D**-0.5)
        err = rel_err(tri(*args), da_ref.decode_attention(*args))
        if not b.gate("decode_attention", case, err < TOL[b.dtype], err):
            continue
        nbytes = 2 * int(lens.sum()) * HKV * D * k.element_size()
        b.record("decode_attention", case, "triton", lambda: tri(*args), nbytes)
        kc = k[table.long()].reshape(B, nb * S, HKV, D).transpose(1, 2)  # [B, Hkv, L, D]
        vc = v[table.long()].reshape(B, nb * S, HKV, D).transpose(1, 2)
        kc, vc = kc[:, :, :L].contiguous(), vc[:, :, :L].contiguous()
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q[:, :, None], kc, vc, enable_gqa=True
        )
        b.record(
            "decode_attention",
            case,
            "torch_sdpa_contiguous",
            sdpa,
            2 * kc.numel() * kc.element_size(),
        )
        if B * L <= 64 * 1024:
            b.record(
                "decode_attention",
                case,
                "reference",
                lambda: da_ref.decode_attention(*args),
                nbytes,
            )


def bench_score_landmarks(b: Bench, cases: list[tuple[int, int]]) -> None:
    from shadowkv.kernels.score_landmarks.triton import score_landmarks as tri

    Pc = 64
    for B, N in cases:
        case = f"B{B}-N{N}"
        pages = -(-N // Pc)
        q = torch.randn(B, H, D, device=b.dev, dtype=b.dtype)
        lm = (torch.randn(B * pages, Pc, HKV, D, device=b.dev) * 0.5).to(b.dtype)
        table = torch.randperm(B * pages, device=b.dev).view(B, pages).int()
        counts = (N - torch.randint(0, 8, (B,), device=b.dev)).int()
        args = (q, lm, table, counts, D**-0.5)
        err = rel_err(tri(*args), sl_ref.score_landmarks(*args))
        if not b.gate("score_landmarks", case, err < TOL[b.dtype], err):
            continue
        nbytes = int(counts.sum()) * HKV * D * lm.element_size() + B * HKV * pages * Pc * 4
        b.record("score_landmarks", case, "triton", lambda: tri(*args), nbytes)
        b.record(
            "score_landmarks", case, "reference", lambda: sl_ref.score_landmarks(*args), nbytes
        )


def selection_inputs(b: Bench, B: int, N: int, K: int) -> tuple:
    """Scores of two consecutive steps (drifted) and the slots after the first, as prev_ids."""
    Pc = 64
    pages = -(-N // Pc)
    ids = torch.arange(B * pages * Pc, device=b.dev, dtype=torch.int32).view(B * pages, Pc, 1)
    ids = ids.expand(-1, -1, HKV).contiguous()
    table = torch.randperm(B * pages, device=b.dev).view(B, pages).int()
    sel = torch.full((B,), K, device=b.dev, dtype=torch.int32)
    s0 = torch.randn(B, HKV, pages * Pc, device=b.dev)
    prev, _ = sc_ref.select_chunks(
        s0, ids, table, sel, torch.full((B, HKV, K), -1, device=b.dev, dtype=torch.int32)
    )
    s1 = s0 + 0.35 * torch.randn_like(s0)
    return s1, ids, table, sel, prev


def bench_select_chunks(b: Bench, cases: list[tuple[int, int, int]]) -> None:
    """The decode step's selection: topk + one kernel that updates the state in place."""
    from shadowkv.kernels.select_chunks.triton import select_chunks_inplace as tri

    for B, N, K in cases:
        case = f"B{B}-N{N}-K{K}"
        scores, ids, table, num_select, prev = selection_inputs(b, B, N, K)
        rows = torch.arange(B, device=b.dev) * 2  # every other slot row
        state = torch.full((2 * B, HKV, K), -1, dtype=torch.int32, device=b.dev)
        state[rows] = prev
        primed = torch.ones(B, dtype=torch.bool, device=b.dev)

        def run(fn, st: torch.Tensor):  # noqa: ANN001, ANN202
            counters = torch.zeros(2, dtype=torch.int64, device=b.dev)
            return fn(scores, ids, table, num_select, st, rows, K, primed, counters)

        ref_state = state.clone()
        out, ref = run(tri, state.clone()), run(sc_ref.select_chunks_inplace, ref_state)
        ok = torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        hits = 1 - ref[1].float().mean().item()
        if not b.gate("select_chunks", case, ok, None):
            continue
        nbytes = scores.numel() * 4 + 3 * B * HKV * K * 4
        # Timed on a state that keeps its first selection (the same work every call).
        b.record("select_chunks", case, "triton", lambda: run(tri, state.clone()), nbytes,
                 hit_rate=round(hits, 3))
        b.record("select_chunks", case, "reference",
                 lambda: run(sc_ref.select_chunks_inplace, state.clone()), nbytes)
        b.record("select_chunks", case, "topk_only", lambda: scores.topk(K, dim=-1), nbytes)


def bench_rope(b: Bench, cases: list[int]) -> None:
    """q and k of T tokens rotated in one launch (the decode step's T is the batch)."""
    from shadowkv.kernels.rope.reference import apply_rope as ref
    from shadowkv.kernels.rope.triton import apply_rope as tri

    for T in cases:
        case = f"T{T}"
        q = torch.randn(T, H, D, device=b.dev, dtype=b.dtype)
        k = torch.randn(T, HKV, D, device=b.dev, dtype=b.dtype)
        cos, sin = (torch.randn(T, D // 2, device=b.dev, dtype=b.dtype) for _ in range(2))
        got, want = tri(q, k, cos, sin), ref(q, k, cos, sin)
        err = max(rel_err(got[0], want[0]), rel_err(got[1], want[1]))
        if not b.gate("rope", case, err < TOL[b.dtype], err):
            continue
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * 2
        b.record("rope", case, "triton", lambda: tri(q, k, cos, sin), nbytes)
        b.record("rope", case, "reference", lambda: ref(q, k, cos, sin), nbytes)


def bench_rms_norm(b: Bench, cases: list[tuple[int, int]]) -> None:
    """RMSNorm fused with the residual add (reads x and residual, writes both outputs)."""
    from shadowkv.kernels.rms_norm.reference import rms_norm as ref
    from shadowkv.kernels.rms_norm.triton import rms_norm as tri

    for T, hidden in cases:
        case = f"T{T}-hidden{hidden}"
        x = torch.randn(T, hidden, device=b.dev, dtype=b.dtype)
        res = torch.randn_like(x)
        w = torch.randn(hidden, device=b.dev, dtype=b.dtype)
        got, want = tri(x, w, 1e-5, res), ref(x, w, 1e-5, res)
        err = max(rel_err(got[0], want[0]), rel_err(got[1], want[1]))
        if not b.gate("rms_norm", case, err < TOL[b.dtype], err):
            continue
        nbytes = 4 * x.numel() * x.element_size()
        b.record("rms_norm", case, "triton", lambda: tri(x, w, 1e-5, res), nbytes)
        b.record("rms_norm", case, "reference", lambda: ref(x, w, 1e-5, res), nbytes)


def bench_silu_mul(b: Bench, cases: list[tuple[int, int]]) -> None:
    from shadowkv.kernels.silu_mul.reference import silu_mul as ref
    from shadowkv.kernels.silu_mul.triton import silu_mul as tri

    for T, inter in cases:
        case = f"T{T}-I{inter}"
        gate_up = torch.randn(T, 2 * inter, device=b.dev, dtype=b.dtype)
        err = rel_err(tri(gate_up), ref(gate_up))
        if not b.gate("silu_mul", case, err < TOL[b.dtype], err):
            continue
        nbytes = 3 * T * inter * gate_up.element_size()
        b.record("silu_mul", case, "triton", lambda: tri(gate_up), nbytes)
        b.record("silu_mul", case, "reference", lambda: ref(gate_up), nbytes)


def slot_inputs(b: Bench, B: int, n_chunks: int, K: int, miss_rate: float) -> dict:
    slot_ids = torch.rand(B, HKV, n_chunks, device=b.dev).argsort(-1)[..., :K].int().contiguous()
    return dict(
        slot_ids=slot_ids,
        miss=torch.rand(B, HKV, K, device=b.dev) < miss_rate,
        dst_rows=torch.arange(B * K * C, device=b.dev).view(B, K * C),
    )


def bench_reconstruct_keys(b: Bench, cases: list[tuple[int, int, int]], miss_rate: float) -> None:
    from shadowkv.kernels.reconstruct_keys.triton import reconstruct_keys as tri

    P = 256
    for B, L, K in cases:
        case = f"B{B}-L{L}-K{K}-miss{miss_rate}"
        pages = -(-L // P)
        kw = dict(
            k_cache=torch.zeros(B * K * C // 16, 16, HKV, D, device=b.dev, dtype=b.dtype),
            a_pages=torch.randn(B * pages, P, R, device=b.dev, dtype=b.dtype),
            page_table=torch.randperm(B * pages, device=b.dev).view(B, pages).int(),
            w_t=(torch.randn(B, R, HKV * D, device=b.dev) / R**0.5).to(b.dtype),
            seg_basis=torch.arange(B, device=b.dev)[:, None],
            seg_starts=torch.zeros(B, 1, device=b.dev, dtype=torch.int32),
            cos=torch.randn(L, D // 2, device=b.dev),
            sin=torch.randn(L, D // 2, device=b.dev),
            chunk_size=C,
            **slot_inputs(b, B, L // C, K, miss_rate),
        )
        ref_kw = {**kw, "k_cache": kw["k_cache"].clone()}
        tri(**kw)
        rk_ref.reconstruct_keys(**ref_kw)
        err = rel_err(kw["k_cache"], ref_kw["k_cache"])
        if not b.gate("reconstruct_keys", case, err < TOL[b.dtype], err):
            continue
        misses = int(kw["miss"].sum())
        el = kw["k_cache"].element_size()
        nbytes = misses * C * (R + D) * el + B * R * HKV * D * el
        b.record("reconstruct_keys", case, "triton", lambda: tri(**kw), nbytes)
        b.record(
            "reconstruct_keys", case, "reference", lambda: rk_ref.reconstruct_keys(**ref_kw), nbytes
        )


def bench_gather_values(b: Bench, cases: list[tuple[int, int, int]], miss_rate: float) -> None:
    from shadowkv.kernels.gather_values.triton import gather_values as tri

    Pc = 64
    for B, L, K in cases:
        case = f"B{B}-L{L}-K{K}-miss{miss_rate}"
        n_chunks = L // C
        pages = -(-n_chunks // Pc)
        # Drawn on the device (CPU randn of a GiB-sized store takes seconds), then copied out.
        on_gpu = torch.randn(B * pages, Pc, HKV, C * D, dtype=b.dtype, device=b.dev)
        store = on_gpu.cpu()
        if b.dev == "cuda":
            store = store.pin_memory()
        kw = dict(
            v_cache=torch.zeros(B * K * C // 16, 16, HKV, D, device=b.dev, dtype=b.dtype),
            store=store,
            store_table=torch.randperm(B * pages, device=b.dev).view(B, pages).int(),
            **slot_inputs(b, B, n_chunks, K, miss_rate),
        )
        ref_kw = {**kw, "v_cache": kw["v_cache"].clone()}
        dev_kw = {**kw, "store": on_gpu, "v_cache": kw["v_cache"].clone()}
        gv_ref.gather_values(**ref_kw)
        tri(**dev_kw)
        if not b.gate(
            "gather_values",
            case + "-device_store",
            torch.equal(dev_kw["v_cache"], ref_kw["v_cache"]),
            None,
        ):
            continue
        nbytes = int(kw["miss"].sum()) * C * D * store.element_size()
        b.record("gather_values", case, "triton_store_on_device", lambda: tri(**dev_kw), nbytes)
        b.record(
            "gather_values",
            case,
            "reference_host_gather_copy",
            lambda: gv_ref.gather_values(**ref_kw),
            nbytes,
            "h2d",
        )
        try:
            tri(**kw)
            ok = torch.equal(kw["v_cache"], ref_kw["v_cache"])
        except Exception as exc:  # e.g. a driver that refuses host pointers
            b.add(
                dict(op="gather_values", case=case, impl="triton_zero_copy", error=repr(exc)[:300])
            )
            continue
        if b.gate("gather_values", case + "-zero_copy", ok, None):
            b.record("gather_values", case, "triton_zero_copy", lambda: tri(**kw), nbytes, "h2d")
        # fp8 store (value_dtype="fp8"): codes + a float32 scale per token, zero-copy as above;
        # its time against the row above is what halving the bytes buys.
        codes, scales = quantize_fp8(on_gpu.view(B * pages, Pc, HKV, C, D))
        codes, scales = codes.view(B * pages, Pc, HKV, C * D).cpu(), scales.cpu()
        if b.dev == "cuda":
            codes, scales = codes.pin_memory(), scales.pin_memory()
        fp8_kw = {**kw, "store": codes, "scales": scales, "v_cache": kw["v_cache"].clone()}
        fp8_ref = {**fp8_kw, "v_cache": kw["v_cache"].clone()}
        tri(**fp8_kw)
        gv_ref.gather_values(**fp8_ref)
        err = rel_err(fp8_kw["v_cache"], fp8_ref["v_cache"])
        if b.gate("gather_values", case + "-fp8_zero_copy", err < TOL[b.dtype], err):
            fp8_bytes = int(kw["miss"].sum()) * C * (D + 4)
            b.record("gather_values", case, "triton_zero_copy_fp8", lambda: tri(**fp8_kw),
                     fp8_bytes, "h2d")


def markdown(b: Bench, meta: dict[str, Any]) -> str:
    lines = [f"# Kernel benchmarks: {meta['device_name']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "| op | case | impl | ms | GB/s | of ceiling | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in b.rows:
        check = (
            ("ok" if r["ok"] else "FAIL")
            + (f" err={r['rel_err']:.1e}" if r.get("rel_err") is not None else "")
            if "ok" in r
            else ""
        )
        if "error" in r:
            check = "ERROR " + r["error"][:80]
        lines.append(
            f"| {r['op']} | {r['case']} | {r['impl']} | {r.get('ms', '')} | {r.get('gbps', '')} | "
            f"{r.get('of_ceiling', '')} | {check} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one timed call (CPU interpreter)"
    )
    p.add_argument("--check-only", action="store_true", help="correctness gates only, no timing")
    p.add_argument(
        "--ops",
        default="decode_attention,score_landmarks,select_chunks,reconstruct_keys,gather_values,"
        "rope,rms_norm,silu_mul",
    )
    p.add_argument("--miss-rate", type=float, default=0.4, help="fraction of slots missed per step")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    b = Bench(dev, dtype, args.smoke or dev == "cpu", args.check_only)
    torch.manual_seed(0)
    small = b.smoke
    suites: dict[str, Callable[[], None]] = {
        "decode_attention": lambda: bench_decode_attention(
            # (7, 122880): one layer of dense's max batch at the throughput target's context.
            b,
            [(2, 100)]
            if small
            else [(1, 32768), (7, 122880), (8, 8192), (32, 4096), (64, 2048 + 512)],
        ),
        "score_landmarks": lambda: bench_score_landmarks(
            b, [(2, 70)] if small else [(1, 16384), (16, 4096), (64, 4096)]
        ),
        "select_chunks": lambda: bench_select_chunks(
            b, [(2, 128, 16)] if small else [(16, 4096, 256), (64, 4096, 256), (8, 16384, 256)]
        ),
        "reconstruct_keys": lambda: bench_reconstruct_keys(
            b, [(2, 512, 8)] if small else [(16, 32768, 256), (64, 32768, 256)], args.miss_rate
        ),
        "gather_values": lambda: bench_gather_values(
            b, [(2, 512, 8)] if small else [(16, 32768, 256), (64, 16384, 256)], args.miss_rate
        ),
        # Decode steps at batch 8 and 64, Llama-3.1-8B (hidden 4096, intermediate 14336).
        "rope": lambda: bench_rope(b, [3] if small else [8, 64, 4096]),
        "rms_norm": lambda: bench_rms_norm(b, [(3, 96)] if small else [(64, 4096), (4096, 4096)]),
        "silu_mul": lambda: bench_silu_mul(
            b, [(3, 80)] if small else [(64, 14336), (4096, 14336)]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    b.live = args.out / "rows.jsonl"
    b.live.write_text("")
    measure_ceilings(b)
    failed = False
    for op in args.ops.split(","):
        try:
            suites[op]()
        except Exception:
            failed = True
            b.add(dict(op=op, case="-", impl="suite", error=traceback.format_exc()[-300:]))
        if dev == "cuda":
            torch.cuda.empty_cache()
    meta = dict(
        device_name=torch.cuda.get_device_name()
        if dev == "cuda"
        else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        dtype=str(dtype),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        smoke=b.smoke,
        copy_gbps=round(b.ceiling.get("copy", 0), 1),
        h2d_gbps=round(b.ceiling.get("h2d", 0), 1),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(dict(meta=meta, rows=b.rows), indent=1))
    table = markdown(b, meta)
    (args.out / "kernels.md").write_text(table)
    print(table)
    gate_failed = any(r.get("ok") is False or "error" in r for r in b.rows)
    return 1 if failed or gate_failed else 0


if __name__ == "__main__":
    sys.exit(main())
