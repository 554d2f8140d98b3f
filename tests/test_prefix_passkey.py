"""ShadowKV at its default settings answers passkey questions over a shared prefix as it does
unshared (SmolLM2-135M, ~2K tokens; slow: three CPU prefills)."""

from __future__ import annotations

from pathlib import Path

import pytest
from utils import PASSKEY_ANSWER, PASSKEY_QUESTION, passkey_prompt, read_essays

from shadowkv import LLM, EngineConfig, SamplingParams, ShadowKVConfig

QUESTIONS = [PASSKEY_QUESTION, "\n\nWhich number is the secret passkey? The secret passkey is"]


@pytest.mark.slow
def test_shadowkv_passkey_over_a_shared_prefix(smollm2_dir: Path, pg_essays: Path) -> None:
    base = LLM(str(smollm2_dir), cache=ShadowKVConfig(), device="cpu")
    document = passkey_prompt(read_essays(pg_essays), base.tokenizer, 2048)
    document = document[: -len(PASSKEY_QUESTION)]
    params = SamplingParams(max_tokens=8)
    unshared = [base.generate(document + q, params)[0] for q in QUESTIONS]
    base.set_cache(ShadowKVConfig(), EngineConfig(prefix_cache=True))
    shared = [base.generate(document + q, params)[0] for q in QUESTIONS]
    assert shared[0].metrics["cached_tokens"] == 0
    assert shared[1].metrics["cached_tokens"] > 1800  # the document's whole blocks
    for u, s in zip(unshared, shared):
        assert PASSKEY_ANSWER in u.text
        assert s.text == u.text
