"""ShadowKV at its default settings answers passkey questions over a shared prefix as it does
unshared (SmolLM2-135M, ~4K tokens: sparse at the default 2048-token budget, so the second
question holds the document's factor, landmark and value pages; slow: three CPU prefills)."""

from __future__ import annotations

from pathlib import Path

import pytest
from utils import PASSKEY_ANSWER, PASSKEY_QUESTION, passkey_prompt, read_essays

from shadowkv import LLM, EngineConfig, SamplingParams, ShadowKVConfig

QUESTIONS = [PASSKEY_QUESTION, "\n\nWhich number is the secret passkey? The secret passkey is"]


@pytest.mark.slow
def test_shadowkv_passkey_over_a_shared_prefix(smollm2_dir: Path, pg_essays: Path) -> None:
    base = LLM(str(smollm2_dir), cache=ShadowKVConfig(), device="cpu")
    document = passkey_prompt(read_essays(pg_essays), base.tokenizer, 4096)
    document = document[: -len(PASSKEY_QUESTION)]
    params = SamplingParams(max_tokens=8)
    unshared = [base.generate(document + q, params)[0] for q in QUESTIONS]
    base.set_cache(ShadowKVConfig(), EngineConfig(prefix_cache=True))
    shared = [base.generate(document + q, params)[0] for q in QUESTIONS]
    assert base.engine.shares_pages  # the second question holds the document's ShadowKV pages
    assert shared[0].metrics["cached_tokens"] == 0
    assert shared[1].metrics["cached_tokens"] > 3800  # the document's whole 128-token pages
    for u, s in zip(unshared, shared):
        assert PASSKEY_ANSWER in u.text
        assert PASSKEY_ANSWER in s.text, (s.text, u.text)
