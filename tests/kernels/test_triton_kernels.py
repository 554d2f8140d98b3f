"""Every Triton kernel compiles ahead of time for Hopper (sm_90) at Llama-3.1-8B shapes, unspilled.

The interpreter runs kernels as numpy and skips the compiler, so it cannot catch what only the
compiler rejects (type clashes in loops, bad layouts) or register spills. A child process (this
file run as a script, without ``TRITON_INTERPRET``) runs each launcher with a recording stand-in
for its kernel, specialises the recorded arguments the way the JIT does (16-divisible ints and
pointers), compiles them with Triton's own ``ptxas`` and reads the cubin's resource usage with the
bundled ``cuobjdump``. No GPU is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.bool: "i1",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Llama-3.1-8B attention: 32 query heads, 8 KV heads, head dim 128, bf16.
B, H, HKV, D, C, R, K = 4, 32, 8, 128, 8, 160, 256
BF16 = dict(dtype=torch.bfloat16)
I32 = dict(dtype=torch.int32)


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the call."""

    def __init__(self, kernel) -> None:
        self.fn = getattr(kernel, "fn", kernel)  # the Python function under the JIT wrapper
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_sm90(rec: Recorder, args: tuple, kwargs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(rec.fn)
    names = fn.arg_names
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif name in kwargs or (isinstance(v, int) and v == 1):  # the JIT specialises ints == 1
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, int):
            sig[name] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(cubin: bytes) -> str:
    """The cubin's ``REG:.. STACK:.. LOCAL:..`` line, or ``""`` without a ``cuobjdump``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if found is None:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [found, "--dump-resource-usage", str(path)], capture_output=True, text=True
        )
    return next((line.strip() for line in out.stdout.splitlines() if "REG:" in line), "")


def kernel_module(op: str):
    import importlib

    return importlib.import_module(f"shadowkv.kernels.{op}.triton")


def launch_decode_attention() -> None:
    q = torch.zeros(B, H, D, **BF16)
    cache = torch.zeros(B * 64, 16, HKV, D, **BF16)
    table = torch.arange(B * 64, **I32).view(B, 64)
    kernel_module("decode_attention").decode_attention(
        q, cache, cache, table, torch.full((B,), 1000, **I32), D**-0.5
    )


def launch_varlen_attention() -> None:
    # A packed prefill: a long prompt's later chunk next to two whole short prompts.
    tq, tk = [1024, 100, 37], [8192, 100, 37]
    cu_q = torch.tensor([0, 1024, 1124, 1161], **I32)
    cu_k = torch.tensor([0, 8192, 8292, 8329], **I32)
    q = torch.zeros(sum(tq), H, D, **BF16)
    kv = torch.zeros(sum(tk), HKV, D, **BF16)
    kernel_module("varlen_attention").varlen_attention(q, kv, kv, cu_q, cu_k, max(tq), D**-0.5)


def launch_score_landmarks() -> None:
    q = torch.zeros(B, H, D, **BF16)
    lm = torch.zeros(B * 8, 64, HKV, D, **BF16)
    table = torch.arange(B * 8, **I32).view(B, 8)
    kernel_module("score_landmarks").score_landmarks(
        q, lm, table, torch.full((B,), 500, **I32), D**-0.5
    )


def launch_select_chunks() -> None:
    scores = torch.rand(B, HKV, 512)
    ids = torch.arange(B * 512 * HKV, **I32).view(B * 8, 64, HKV)
    table = torch.arange(B * 8, **I32).view(B, 8)
    state = torch.full((2 * B + 1, HKV, K), -1, **I32)  # every sequence slot's selection
    kernel_module("select_chunks").select_chunks_inplace(
        scores,
        ids,
        table,
        torch.full((B,), K, **I32),
        state,
        torch.arange(B) * 2,
        K,
        torch.ones(B, dtype=torch.bool),
        torch.zeros(2, dtype=torch.int64),
    )


def slot_args() -> dict:
    return dict(
        slot_ids=torch.arange(K, **I32).expand(B, HKV, K).contiguous(),
        miss=torch.ones(B, HKV, K, dtype=torch.bool),
        dst_rows=torch.arange(B * K * C).view(B, K * C),
    )


def launch_reconstruct_keys() -> None:
    kernel_module("reconstruct_keys").reconstruct_keys(
        k_cache=torch.zeros(B * K * C // 16, 16, HKV, D, **BF16),
        a_pages=torch.zeros(B * 16, 256, R, **BF16),
        page_table=torch.arange(B * 16, **I32).view(B, 16),
        w_t=torch.zeros(2 * B, R, HKV * D, **BF16),
        seg_basis=torch.arange(2 * B).view(B, 2),  # two segments: a shared prefix + the rest
        seg_starts=torch.tensor([0, 1024], **I32).repeat(B, 1),
        cos=torch.zeros(4096, D // 2),
        sin=torch.zeros(4096, D // 2),
        chunk_size=C,
        **slot_args(),
    )


def launch_gather_values() -> None:
    kernel_module("gather_values").gather_values(
        v_cache=torch.zeros(B * K * C // 16, 16, HKV, D, **BF16),
        store=torch.zeros(B * 8, 64, HKV, C * D, **BF16),
        store_table=torch.arange(B * 8, **I32).view(B, 8),
        **slot_args(),
    )


def launch_rope() -> None:
    T = 64  # a prefill slice's worth of tokens
    kernel_module("rope").apply_rope(
        torch.zeros(T, H, D, **BF16), torch.zeros(T, HKV, D, **BF16),
        torch.zeros(T, D // 2), torch.zeros(T, D // 2),
    )


def launch_rms_norm() -> None:
    T, hidden = 8, 4096  # a decode batch's rows; Llama-3.1-8B's hidden size
    x = torch.zeros(T, hidden, **BF16)
    kernel_module("rms_norm").rms_norm(x, torch.ones(hidden, **BF16), 1e-5, torch.zeros_like(x))


def launch_silu_mul() -> None:
    T, inter = 8, 14336  # Llama-3.1-8B's intermediate size
    kernel_module("silu_mul").silu_mul(torch.zeros(T, 2 * inter, **BF16))


KERNELS = {
    "_rope_kernel": ("rope", launch_rope),
    "_decode_attention_split_kernel": ("decode_attention", launch_decode_attention),
    "_decode_attention_reduce_kernel": ("decode_attention", launch_decode_attention),
    "_varlen_attention_kernel": ("varlen_attention", launch_varlen_attention),
    "_score_landmarks_logits_kernel": ("score_landmarks", launch_score_landmarks),
    "_score_landmarks_normalize_kernel": ("score_landmarks", launch_score_landmarks),
    "_select_chunks_kernel": ("select_chunks", launch_select_chunks),
    "_reconstruct_keys_kernel": ("reconstruct_keys", launch_reconstruct_keys),
    "_gather_values_kernel": ("gather_values", launch_gather_values),
    "_rms_norm_kernel": ("rms_norm", launch_rms_norm),
    "_silu_mul_kernel": ("silu_mul", launch_silu_mul),
}


def compile_all() -> dict[str, dict]:
    """Record and compile every kernel; ``{name: {"usage": str} or {"error": str}}``."""
    results: dict[str, dict] = {}
    for op, launch in dict(KERNELS.values()).items():
        module = kernel_module(op)
        names = [n for n, (o, _) in KERNELS.items() if o == op]
        kernels = {n: getattr(module, n) for n in names}
        recs = {n: Recorder(k) for n, k in kernels.items()}
        for n, rec in recs.items():
            setattr(module, n, rec)
        try:
            launch()
        finally:
            for n, k in kernels.items():
                setattr(module, n, k)
        for n, rec in recs.items():
            try:
                if len(rec.calls) != 1:
                    raise RuntimeError(f"launched {len(rec.calls)} times")
                cubin = compile_sm90(rec, *rec.calls[0]).asm["cubin"]
                results[n] = {"usage": resource_usage(cubin)}
            except Exception as exc:  # reported per kernel by the test
                results[n] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the other kernel tests compile natively"
)
@pytest.mark.parametrize("name", list(KERNELS), ids=lambda n: n.strip("_").removesuffix("_kernel"))
def test_compiles_for_hopper_without_spills(name: str, compiled: dict[str, dict]) -> None:
    result = compiled[name]
    assert "error" not in result, result.get("error")
    if not result["usage"]:
        pytest.skip("no cuobjdump to read the resource usage (compilation itself passed)")
    assert "STACK:0 " in result["usage"] and "LOCAL:0 " in result["usage"], result["usage"]


OPS = [
    "rope", "decode_attention", "score_landmarks", "select_chunks", "reconstruct_keys",
    "gather_values", "rms_norm", "silu_mul", "varlen_attention",
]


@pytest.mark.parametrize("op", OPS)
def test_dispatch_modes(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowkv.kernels._dispatch import has_triton_kernel, use_triton

    t = torch.zeros(1)
    assert has_triton_kernel(op)
    monkeypatch.setenv("SHADOWKV_KERNELS", "triton")
    assert use_triton(t, op)
    assert not use_triton(t, "no_such_op"), "forcing Triton must skip ops without a kernel"
    monkeypatch.setenv("SHADOWKV_KERNELS", "torch")
    assert not use_triton(t, op)
    monkeypatch.delenv("SHADOWKV_KERNELS")
    assert not use_triton(t, op), "auto mode keeps CPU tensors on the reference"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
