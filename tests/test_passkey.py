"""SmolLM2-135M retrieves a passkey from ~2K tokens of essays with the dense cache."""

from __future__ import annotations

from pathlib import Path

from utils import (
    PASSKEY_ANSWER,
    PASSKEY_HEADER,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    passkey_prompt,
    read_essays,
)

from shadowkv import LLM, SamplingParams

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


def test_smollm2_finds_the_passkey_at_half_depth(smollm2: LLM, pg_essays: Path) -> None:
    prompt = passkey_prompt(read_essays(pg_essays), smollm2.tokenizer, TARGET_TOKENS, depth=0.5)
    result = smollm2.generate(prompt, SamplingParams(max_tokens=8))[0]
    assert PASSKEY_ANSWER in result.text, result.text
