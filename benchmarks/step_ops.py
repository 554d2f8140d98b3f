"""Kernel launches per layer of one decode step, counted on the CPU.

A decode step at small batch is bound by how many kernels it launches, not by bytes; this script
counts them without a GPU. It runs the fixed-shape step that CUDA graphs capture
(``decode_mode="static"``) with the Triton kernels (interpreted on a CPU), and counts, per
decoder layer, the aten ops that would launch a kernel (not views, allocations, or casts and
copies that return their input) plus Triton launches. Ops outside the layers (embedding, the
step plan, final norm, LM head) are reported apart.

    python benchmarks/step_ops.py                     # SmolLM2 (the default model): dense, ShadowKV
    python benchmarks/step_ops.py --arch tiny --list     # a random-weight config, ops by name
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
os.environ.setdefault("SHADOWKV_KERNELS", "triton")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Ops that never launch a kernel: fresh memory, metadata, host scalars.
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_",
    "set_", "_local_scalar_dense", "lift_fresh", "_unsafe_view", "sym_size", "sym_stride",
}
PROMPTS = [[(k * i) % 90 + 3 for i in range(n)] for k, n in ((7, 300), (11, 211), (13, 157))]


@dataclass
class StepOps:
    """Ops of one decode step: per layer (by op name) and outside the layers."""

    layers: list[Counter] = field(default_factory=list)
    outside: Counter = field(default_factory=Counter)

    @property
    def per_layer(self) -> float:
        return sum(sum(c.values()) for c in self.layers) / max(1, len(self.layers))

    def as_dict(self) -> dict:
        merged: Counter = Counter()
        for c in self.layers:
            merged.update(c)
        n = max(1, len(self.layers))
        return {
            "per_layer": round(self.per_layer, 2),
            "outside_layers": sum(self.outside.values()),
            "by_op_per_layer": {k: round(v / n, 2) for k, v in merged.most_common()},
            "outside_by_op": dict(self.outside.most_common()),
        }


class _Counter(TorchDispatchMode):
    def __init__(self, state: dict) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.state["triton"] or func.is_view or name in NO_KERNEL:
            return out
        if name in ("copy_", "_to_copy") and _returns_input(func, args, out):
            return out
        self.state["target"][name] += 1
        return out


def _returns_input(func, args, out) -> bool:  # noqa: ANN001
    return isinstance(out, torch.Tensor) and args and out is args[0]


def count_step(
    model, runner, seq_ids: list[int], tokens: list[int], positions: list[int]
) -> StepOps:
    """Run one fixed-shape decode step through ``runner`` and count its ops."""
    ops = StepOps(layers=[Counter() for _ in model.layers])
    state = {"triton": False, "target": ops.outside}
    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, i=i: state.__setitem__("target", ops.layers[i])))
        handles.append(layer.register_forward_hook(
            lambda m, a, o: state.__setitem__("target", ops.outside)))
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):  # noqa: ANN001
        state["target"]["triton:" + self.fn.__name__] += 1
        state["triton"] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            state["triton"] = False

    InterpretedFunction.run = counted
    try:
        with _Counter(state):
            runner.step(seq_ids, tokens, positions)
    finally:
        InterpretedFunction.run = run
        for h in handles:
            h.remove()
    return ops


def measure(
    model_path: str | None, arch: str | None, methods: list[str], prompts=PROMPTS
) -> dict:
    """Ops of one steady decode step of ``prompts`` (one batch; each sparse under a 32-token
    budget) for each method, on SmolLM2 or a random-weight ``arch``."""
    from shadowkv.bench.harness import build_engine
    from shadowkv.bench.models import arch_config, random_model
    from shadowkv.cache.methods import method_config
    from shadowkv.config import EngineConfig
    from shadowkv.engine.sampling import SamplingParams

    cpu, dtype = torch.device("cpu"), torch.float32
    if arch is not None:
        model_cfg = arch_config(arch)
        model = random_model(model_cfg, cpu, dtype)
    else:
        from shadowkv.models.loader import load_model, resolve_model

        model_cfg, model = load_model(resolve_model(model_path), cpu, dtype)
    engine_cfg = EngineConfig(
        max_num_seqs=4, max_model_len=1024, cache_memory_gb=0.2, decode_mode="static",
        chunked_prefill=False, max_num_batched_tokens=1,
    )
    knobs = dict(sparse_budget=32, outlier_chunks=2, rank=0.5)
    report = {"model": arch or model_path or "smollm2", "layers": model_cfg.num_layers,
              "batch": len(prompts), "methods": {}}
    for method in methods:
        engine = build_engine(model, model_cfg, method_config(method, **knobs), engine_cfg, cpu,
                              dtype)
        reqs = [engine.add_request([t % model_cfg.vocab_size for t in p],
                                   SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts]
        # The prefills run on the PyTorch references (the interpreter would run their kernels
        # one program per token, slowly; nothing of them is counted); the decode steps on Triton.
        kernels = os.environ.get("SHADOWKV_KERNELS", "triton")
        os.environ["SHADOWKV_KERNELS"] = "torch"
        try:
            while len(engine.running) < len(reqs):
                engine.step()
        finally:
            os.environ["SHADOWKV_KERNELS"] = kernels
        while engine.last_step != "decode":
            engine.step()  # one full-batch step (the first: all misses)
        engine.step()  # a steady step, as counted below
        ids = [r.request_id for r in engine.running]
        with torch.inference_mode():
            ops = count_step(model, engine.runner, ids, [r.output_ids[-1] for r in engine.running],
                             [engine.cache.length(s) for s in ids])
        engine.cache.end_decode()
        report["methods"][method] = ops.as_dict()
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2)")
    p.add_argument("--arch", default=None, help="a random-weight architecture instead (e.g. tiny)")
    p.add_argument("--methods", default="dense,shadowkv")
    p.add_argument("--list", action="store_true", help="print the ops per layer by name")
    args = p.parse_args()
    report = measure(args.model, args.arch, args.methods.split(","))
    for method, r in report["methods"].items():
        print(f"{method}: {r['per_layer']} ops per layer, {r['outside_layers']} outside the "
              f"{report['layers']} layers (batch {report['batch']}, static step, Triton kernels)")
        if args.list:
            for name, n in r["by_op_per_layer"].items():
                print(f"    {n:6.2f}  {name}")
    print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    main()
