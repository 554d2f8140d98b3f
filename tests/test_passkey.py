"""The passkey prompt builder. (That SmolLM2 finds the passkey at ~2K tokens, dense and with
ShadowKV, is checked on the same prompt by ``test_golden.py``.)"""

from __future__ import annotations

from pathlib import Path

from utils import (
    PASSKEY_HEADER,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    passkey_prompt,
    read_essays,
)

from shadowkv import LLM

TARGET_TOKENS = 2048


def test_passkey_prompt_builder(smollm2: LLM, pg_essays: Path) -> None:
    corpus = read_essays(pg_essays)
    prompt = passkey_prompt(corpus, smollm2.tokenizer, TARGET_TOKENS)
    assert prompt.startswith(PASSKEY_HEADER) and prompt.endswith(PASSKEY_QUESTION)
    assert prompt.count(PASSKEY_NEEDLE) == 1
    n = len(smollm2.tokenizer.encode(prompt))
    assert 0.9 * TARGET_TOKENS <= n <= TARGET_TOKENS
    haystack = prompt[len(PASSKEY_HEADER) : -len(PASSKEY_QUESTION)]
    at = haystack.index(PASSKEY_NEEDLE)
    assert 0.4 < at / len(haystack) < 0.6
    # At a sentence boundary: a sentence ends right before it, another starts right after.
    assert haystack[:at].rstrip()[-1] in ".!?"
    assert haystack[at + len(PASSKEY_NEEDLE) :].lstrip()[0].isupper()
