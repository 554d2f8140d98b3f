"""Tool calling with Qwen2.5's chat template (the reference case): tools and tool turns rendered
by the template, ``<tool_call>`` blocks parsed into ``tool_calls``, whole and streamed.

SmolLM2's weights behind a copy of its tokenizer carrying Qwen2.5's template
(``data/qwen25_chat_template.jinja``). For the parsing end to end, the engine's tokens are
scripted (the model would not write a call on cue); everything around them is the real server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
openai = pytest.importorskip("openai", reason="the tests need the 'test' extra")

from shadowkv import LLM, EngineConfig  # noqa: E402
from shadowkv.server.protocol import ChatMessage  # noqa: E402
from shadowkv.server.tools import (  # noqa: E402
    ToolStream,
    parse_calls,
    template_messages,
)
from tests.server.live import Live, serve  # noqa: E402

TEMPLATE = Path(__file__).parent / "data" / "qwen25_chat_template.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_calls() -> None:
    content, calls = parse_calls("Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})
    ]
    assert parse_calls("no calls here") == ("no calls here", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_calls(broken) == (broken, [])
    _, cut = parse_calls('<tool_call>\n{"name": "f", "arguments": {}}')  # no closing tag
    assert [c.function.name for c in cut] == ["f"]


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_tool_stream_never_sends_call_text(step: int) -> None:
    text = "Sure.\n" + CALL
    ts, sent = ToolStream(), ""
    for i in range(0, len(text), step):
        sent += ts.feed(text[i : i + step])
        assert "<" not in sent
    rest, calls = ts.finish()
    assert (sent + rest).strip() == "Sure." and len(calls) == 1
    plain = ToolStream()
    out = plain.feed("a <b> c <tool") + plain.feed("box")
    assert out + plain.finish()[0] == "a <b> c <toolbox" and plain.finish()[1] == []


def test_messages_for_a_template_without_tools() -> None:
    msgs = [
        ChatMessage.model_validate({"role": "user", "content": "hi"}),
        ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}),
        ChatMessage.model_validate({"role": "tool", "tool_call_id": "c1", "content": "21 C"}),
    ]
    from shadowkv.server.protocol import Tool

    out = template_messages(msgs, [Tool.model_validate(WEATHER)], renders_tools=False)
    assert out[0]["role"] == "system" and '"get_weather"' in out[0]["content"]
    assert out[2]["content"].startswith("<tool_call>") and out[3] == {
        "role": "user", "content": "<tool_response>\n21 C\n</tool_response>"
    }


@pytest.fixture(scope="module")
def qwen_style(smollm2_dir: Path, tmp_path_factory) -> Iterator[tuple[Live, object]]:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-qwen-template")
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    tok.chat_template = TEMPLATE.read_text()
    tok.save_pretrained(out)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (out / name).symlink_to(smollm2_dir / name)
    llm = LLM(str(out), device="cpu",
              engine=EngineConfig(max_model_len=1024, max_num_seqs=4, cache_memory_gb=0.25))
    with serve(llm, "qwen-style") as live:
        yield live, openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)


def test_tools_and_tool_turns_go_through_the_template(qwen_style) -> None:
    live, _ = qwen_style
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    ]
    ids = live.client.post("/tokenize", json={"messages": messages, "tools": [WEATHER]}).json()
    text = live.client.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert "# Tools" in text and json.dumps(WEATHER) in text
    assert CALL in text  # the assistant's call, arguments as an object (not a string)
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.fixture()
def scripted(qwen_style, monkeypatch):
    """The engine emits ``text`` (then EOS) whatever the model says."""
    live, client = qwen_style
    engine = live.llm.engine
    append = engine._append

    def script(text: str) -> None:
        tokens = live.llm.tokenizer.encode(text, add_special_tokens=False)
        tokens.append(live.llm.tokenizer.eos_token_id)

        def forced(req, token):
            return append(req, tokens[min(len(req.output_ids), len(tokens) - 1)])

        monkeypatch.setattr(engine, "_append", forced)

    return live, client, script


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_auto_parses_the_models_calls(scripted, stream: bool) -> None:
    _, client, script = scripted
    script("Let me check.\n" + CALL)
    kw = dict(model="qwen-style", messages=[{"role": "user", "content": "Weather in Paris?"}],
              tools=[WEATHER], max_tokens=60, temperature=0)
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls, (
            choice.finish_reason)
    else:
        content, pieces, finish = "", {}, None
        for chunk in client.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                content += c.delta.content or ""
                for tc in c.delta.tool_calls or []:
                    pieces[tc.index] = tc
                finish = c.finish_reason or finish
        calls = [pieces[i] for i in sorted(pieces)]
    assert content.strip() == "Let me check." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert all(c.id.startswith("call-") for c in calls)


def test_auto_without_a_call_is_plain_content(scripted) -> None:
    _, client, script = scripted
    script("It is sunny <b>today</b>.")
    r = client.chat.completions.create(
        model="qwen-style", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
        max_tokens=30, temperature=0,
    )
    assert r.choices[0].message.content == "It is sunny <b>today</b>."
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call(scripted) -> None:
    _, client, script = scripted
    script(CALL + "\n" + CALL.replace("Paris", "Rome"))
    kw = dict(model="qwen-style", messages=[{"role": "user", "content": "Weather?"}],
              tools=[WEATHER], max_tokens=100, temperature=0)
    both = client.chat.completions.create(**kw).choices[0].message.tool_calls
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert len(both) == 2 and len(one.message.tool_calls) == 1
    assert json.loads(one.message.tool_calls[0].function.arguments) == {"city": "Paris"}
