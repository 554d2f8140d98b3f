"""Tokenizer and chat template of a checkpoint directory (through transformers' fast tokenizers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tokenizer:
    """Encode/decode text and render chat messages with the checkpoint's template."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        try:
            # `path` is a local checkpoint directory (see `loader.resolve_model`): never the hub.
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            from shadowkv.models.loader import ModelLoadError

            raise ModelLoadError(f"cannot load the tokenizer in {path}: {err}") from err
        self.eos_token_id: int | None = self._tok.eos_token_id
        self.bos_token_id: int | None = self._tok.bos_token_id

    @property
    def hf(self) -> object:
        """The transformers tokenizer (for grammar engines, which build their tables from it)."""
        return self._tok

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._tok, "chat_template", None)
        return template if isinstance(template, str) else None

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The prompt text for ``messages`` with the assistant turn opened; ``tools`` (OpenAI
        function definitions) are rendered by the template where it knows them."""
        if not self.has_chat_template:
            raise ValueError("this checkpoint has no chat template; send a plain prompt instead")
        return self._tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )

    def chat_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        # The template already includes BOS where the model wants one.
        return self.encode(self.apply_chat_template(messages, tools), add_special_tokens=False)
