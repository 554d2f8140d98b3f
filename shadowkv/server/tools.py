"""Tool calling: messages and tools for the chat template, and calls parsed out of the text.

The reference format is Qwen2.5's (Hermes-style): the template lists the tools in the system
turn and the model answers ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
tool results come back as ``role: "tool"`` messages. A template that does not render tools
(SmolLM2's) gets the same tool list in its system message, written the same way.

``tool_choice``: ``none`` renders no tools and parses nothing; ``auto`` renders them and parses
whatever calls the model writes; ``required`` and a named function force exactly one call with
a JSON-schema grammar (``{"name": ..., "arguments": ...}``), whatever the template knows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shadowkv.server.protocol import ChatMessage, NamedToolChoice, Tool
from shadowkv.server.responses import FunctionCallOut, ToolCallOut, new_id

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

SYSTEM_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}"
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def template_messages(
    messages: list[ChatMessage], tools: list[Tool] | None, renders_tools: bool
) -> list[dict[str, Any]]:
    """Messages as chat templates read them (HF conventions: ``arguments`` as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls:
            calls = [
                {"type": "function", "id": c.id,
                 "function": {"name": c.function.name, "arguments": _loads(c.function.arguments)}}
                for c in m.tool_calls
            ]
            if renders_tools:
                d["tool_calls"] = calls
            else:
                d["content"] = "\n".join(
                    [d["content"]] * bool(d["content"])
                    + [f"{OPEN}\n{json.dumps(c['function'])}\n{CLOSE}" for c in calls]
                )
        if role == "tool":
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if not renders_tools:
                wrapped = f"<tool_response>\n{d['content']}\n</tool_response>"
                d = {"role": "user", "content": wrapped}
        out.append(d)
    if tools and not renders_tools:
        listing = SYSTEM_TOOLS.format(tools="".join("\n" + json.dumps(tool_dict(t)) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def tool_dict(tool: Tool) -> dict[str, Any]:
    return tool.model_dump(exclude_none=True)


def forced_schema(tools: list[Tool], choice: str | NamedToolChoice) -> dict[str, Any]:
    """The JSON schema of one call: to a named function, or (``required``) to any of them."""
    def one(t: Tool) -> dict[str, Any]:
        params = t.function.parameters or {"type": "object"}
        return {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if isinstance(choice, NamedToolChoice):
        return one(next(t for t in tools if t.function.name == choice.function.name))
    if len(tools) == 1:
        return one(tools[0])
    return {"anyOf": [one(t) for t in tools]}


def _call(doc: Any) -> ToolCallOut | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    args = doc.get("arguments", doc.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCallOut(
        id=new_id("call"), function=FunctionCallOut(name=doc["name"], arguments=text)
    )


def parse_forced(text: str) -> list[ToolCallOut]:
    """The call a grammar forced (the whole text is one JSON call); none if it was cut off."""
    try:
        call = _call(json.loads(text))
    except ValueError:
        return []
    return [call] if call else []


def parse_calls(text: str) -> tuple[str, list[ToolCallOut]]:
    """``(content, calls)``: the ``<tool_call>`` blocks that hold a JSON call, and the text
    around them. A block whose JSON does not parse stays in the content."""
    calls, kept, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        try:
            call = _call(json.loads(m.group(1)))
        except ValueError:
            call = None
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls


@dataclass
class ToolStream:
    """Streams content while holding back anything that may be a tool call.

    ``feed(delta)`` returns the text safe to send as content now: text before a possible
    ``<tool_call>`` start; from an opening tag on, everything is held and parsed at the end.
    """

    forced: bool = False
    text: str = ""
    sent: int = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.forced:
            return ""
        start = self.text.find(OPEN)
        limit = start if start >= 0 else len(self.text) - _partial(self.text)
        out = self.text[self.sent : max(self.sent, limit)]
        self.sent = max(self.sent, limit)
        return out

    def finish(self) -> tuple[str, list[ToolCallOut]]:
        """``(content not yet sent, calls)`` once the text is complete."""
        if self.forced:
            return "", parse_forced(self.text)
        content, calls = parse_calls(self.text)
        if not calls:
            return self.text[self.sent :], []
        return content[self.sent :] if content.startswith(self.text[: self.sent]) else "", calls


def _partial(text: str) -> int:
    """Length of the longest ending of ``text`` that starts ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
