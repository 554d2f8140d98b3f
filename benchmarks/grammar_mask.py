"""Token-mask cost per decode step: xgrammar vs llguidance on SmolLM2's vocabulary (49,152).

Both engines follow the same token sequence (a valid answer to each JSON schema, tokenized by
SmolLM2's tokenizer): per step the mask of allowed next tokens is computed (timed), then the
step's token is accepted (timed apart). Compile time (schema -> grammar) and the time to build
the tokenizer tables once are reported too. CPU only; run:

    PYTHONPATH=. python benchmarks/grammar_mask.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

SCHEMA_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
}
DOC_PERSON = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["mathematics", "poetry", "engines"],
    "address": {"city": "London", "zip": "W1"},
}
CASES = {
    "json_object (any JSON)": (None, {"answer": "forty-two", "values": [1, 2, 3], "ok": True}),
    "json_schema (5 fields, nested)": (SCHEMA_PERSON, DOC_PERSON),
}


def xgrammar_runner(tok, vocab: int):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, vocab)

    def compile_(schema):
        if schema is None:
            return compiler.compile_builtin_json_grammar()
        return compiler.compile_json_schema(json.dumps(schema))

    def run(compiled, ids):
        m = xgr.GrammarMatcher(compiled)
        fills, accepts = [], []
        for t in ids:
            a = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            b = time.perf_counter()
            assert m.accept_token(t), "xgrammar refused a token of a valid document"
            fills.append(b - a)
            accepts.append(time.perf_counter() - b)
        return fills, accepts

    return setup, compile_, run, apply_cost(xgr.apply_token_bitmask_inplace, mask, vocab)


def apply_cost(apply, mask, vocab: int) -> float:
    """Microseconds to apply a one-row mask to fp32 logits ``[1, vocab]`` (median of 50)."""
    logits = torch.randn(1, vocab)
    times = []
    for _ in range(50):
        a = time.perf_counter()
        apply(logits, mask)
        times.append(time.perf_counter() - a)
    return 1e6 * statistics.median(times)


def llguidance_runner(tok, vocab: int):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    setup = time.perf_counter() - t0
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile_(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema or {"type": "object"}, defaults={"whitespace_flexible": True}
        )
        return grammar

    def run(grammar, ids):
        m = llguidance.LLMatcher(lltok, grammar)
        fills, accepts = [], []
        for t in ids:
            a = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(m, mask, 0)
            b = time.perf_counter()
            assert m.consume_token(t), f"llguidance refused a token: {m.get_error()}"
            fills.append(b - a)
            accepts.append(time.perf_counter() - b)
        return fills, accepts

    apply_us = apply_cost(llguidance.torch.apply_token_bitmask_inplace, mask, vocab)
    return setup, compile_, run, apply_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from shadowkv.models.loader import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2")), local_files_only=True)
    vocab = len(tok)
    cpu = platform.processor() or platform.machine()
    print(f"# grammar mask cost, SmolLM2 vocab {vocab}, {cpu}")
    print(
        "| engine | case | tokens | setup s | first compile ms | mask us/step p50 | p90 "
        "| accept us/step | apply mask to logits us |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    engines = (("xgrammar 0.2.8", xgrammar_runner), ("llguidance 1.9.1", llguidance_runner))
    for name, make in engines:
        setup, compile_, run, apply_us = make(tok, vocab)
        for case, (schema, doc) in CASES.items():
            ids = tok.encode(json.dumps(doc), add_special_tokens=False)
            fills, accepts, compiles = [], [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                compiled = compile_(schema)
                compiles.append(time.perf_counter() - t0)
                f, a = run(compiled, ids)
                fills += f
                accepts += a
            q = statistics.quantiles(fills, n=10)
            print(
                f"| {name} | {case} | {len(ids)} | {setup:.2f} | "
                f"{1e3 * max(compiles):.1f} | {1e6 * statistics.median(fills):.0f} | "
                f"{1e6 * q[-1]:.0f} | {1e6 * statistics.median(accepts):.0f} | {apply_us:.0f} |"
            )


if __name__ == "__main__":
    main()
