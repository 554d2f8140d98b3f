"""Prefix sharing behind the server: concurrent questions about two documents.

Every answer must equal the unshared engine's, and ``usage.prompt_tokens_details.cached_tokens``
and ``/metrics`` must say how much of the prompts stored prefixes served.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the 'serve' extra: pip install 'shadowkv[serve]'")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra: pip install 'shadowkv[serve]'")

from shadowkv import LLM, EngineConfig, SamplingParams  # noqa: E402
from tests.server.live import serve  # noqa: E402

rng = random.Random(3)
DOCS = [" ".join(f"w{rng.randrange(3, 512)}" for _ in range(300)) for _ in range(2)]
QUESTIONS = [f" w{5 + i} w{60 + i}" for i in range(8)]
MAX_TOKENS = 6


def test_sixteen_concurrent_requests_over_two_documents(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    engine = dict(max_model_len=1024, max_num_seqs=8, cache_memory_gb=0.05)
    plain = LLM(str(path), device="cpu", engine=EngineConfig(**engine))
    prompts = [d + q for d in DOCS for q in QUESTIONS]
    expected = {
        p: plain.generate(p, SamplingParams(max_tokens=MAX_TOKENS))[0].text for p in prompts
    }
    llm = LLM(str(path), device="cpu", engine=EngineConfig(prefix_cache=True, **engine))
    with serve(llm, "tiny") as live:

        def ask(i: int) -> tuple[str, str, dict]:
            body = {"prompt": prompts[i], "max_tokens": MAX_TOKENS, "temperature": 0}
            if i % 2 == 0:
                r = live.client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                out = r.json()
                return prompts[i], out["choices"][0]["text"], out["usage"]
            body.update(stream=True, stream_options={"include_usage": True})
            text, usage = [], None
            with live.client.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    text += [c["text"] for c in chunk["choices"]]
                    usage = chunk.get("usage") or usage
            return prompts[i], "".join(text), usage

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, range(16)))
        m = live.wait_idle()
    for prompt, text, _ in results:
        assert text == expected[prompt]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for _, _, u in results]
    # Each document's first prefill stores it; the others find at least its whole blocks.
    doc_blocks = min(len(plain.tokenizer.encode(d)) for d in DOCS) // 16 * 16
    assert sum(c >= doc_blocks for c in cached) >= 14, cached
    assert m["shadowkv_prefix_hits_total"] == sum(c > 0 for c in cached)
    assert m["shadowkv_cached_tokens_total"] == sum(cached)
    # Dense stores its cache pages (the two documents' whole blocks), no host copies.
    block = llm.engine.cache.blocks.page_bytes
    assert m["shadowkv_prefix_store_bytes"] == 0 and m["shadowkv_prefix_shared_host_bytes"] == 0
    assert m["shadowkv_prefix_shared_device_bytes"] >= 2 * (doc_blocks // 16) * block
    assert m["shadowkv_cache_device_bytes"] == 0  # every request ended: no request holds memory
