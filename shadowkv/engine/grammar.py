"""JSON-constrained decoding through a grammar engine's token mask (xgrammar).

A JSON schema is compiled once per schema (cached) against the tokenizer's vocabulary; each
request that asks for one gets its own matcher, which at every step fills a bitmask of the
tokens that keep the output a prefix of a matching document and then accepts the sampled token.
Once the document is complete only EOS is allowed, so generation stops there.

xgrammar was chosen over llguidance by measuring the mask cost per step on SmolLM2's 49,152-token
vocabulary (``benchmarks/grammar_mask.py``, ``benchmarks/RESULTS.md``): ~5 us vs ~14 us median.
It is optional (the ``serve`` extra installs it); without it a request asking for structured
output gets a ``GrammarError`` (a 400 from the server) that says what to install.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from shadowkv.engine.sampling import SamplingError

INSTALL = "pip install 'shadowkv[serve]' (or: pip install xgrammar)"


class GrammarError(SamplingError):
    """Structured output cannot be had: the schema is invalid, or no grammar engine is installed."""


class Grammars:
    """Schema -> compiled grammar for one tokenizer; the tables are built on first use.

    Thread-safe: the server compiles off the engine thread to refuse a bad schema with a 400
    before queueing, and the engine then finds the compiled grammar cached.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        # ``tokenizer.hf`` (the transformers tokenizer) is read on first use only: engines
        # built with a stand-in tokenizer (benchmarks) never need it.
        self._tok, self.vocab_size, self._stop = tokenizer, vocab_size, list(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _xgr(self) -> Any:
        try:
            import xgrammar
        except ImportError as err:
            raise GrammarError(
                f"structured output needs the xgrammar package, which is not installed: {INSTALL}"
            ) from err
        with self._lock:
            if self._compiler is None:
                hf = getattr(self._tok, "hf", None)
                if hf is None:
                    raise GrammarError("this engine's tokenizer cannot build grammar tables")
                info = xgrammar.TokenizerInfo.from_huggingface(
                    hf, vocab_size=self.vocab_size, stop_token_ids=self._stop
                )
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return xgrammar

    def compile(self, schema: Mapping[str, Any]) -> Any:
        """The compiled grammar of ``schema`` (xgrammar caches by schema text; properties are
        generated in the schema's order, so keys are not sorted)."""
        self._xgr()
        try:
            return self._compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False
            )
        except Exception as err:  # xgrammar raises RuntimeError/ValueError on a bad schema
            raise GrammarError(f"the JSON schema cannot be used: {err}") from err

    def matcher(self, schema: Mapping[str, Any]) -> Matcher:
        return Matcher(self._xgr(), self.compile(schema))


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, xgr: Any, compiled: Any) -> None:
        self._xgr = xgr
        self._m = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        if self._m.is_terminated():
            return False
        return bool(self._m.accept_token(token))


def apply_masks(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
    """Set to ``-inf`` the logits ``[R, V]`` of tokens each row's matcher refuses (None: none)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    first = next(m for m in matchers if m is not None)
    xgr = first._xgr
    mask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])
    for j, i in enumerate(rows):
        matchers[i].fill(mask, j)  # type: ignore[union-attr]
    sub = logits[rows].float() if rows != list(range(len(matchers))) else logits
    xgr.apply_token_bitmask_inplace(sub, mask.to(logits.device))
    if sub is not logits:
        logits[rows] = sub
