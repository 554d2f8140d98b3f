"""``shadowkv generate``: one prompt in, text (or JSON with timing and memory) out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shadowkv.commands.common import add_model_args, llm_from_args
from shadowkv.engine.engine import PromptError
from shadowkv.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from shadowkv.llm import LLM

DEMO_DOCUMENT = Path(__file__).resolve().parents[1] / "data" / "demo_document.txt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt; '-' or omitted reads stdin")
    p.add_argument("--file", type=Path, action="append", default=[],
                   help="read text from a file and put it before the prompt (repeatable); "
                   "'demo' names the long document shipped with shadowkv")
    add_model_args(p)
    s = p.add_argument_group("sampling")
    defaults = SamplingParams()
    s.add_argument("--max-new-tokens", type=int, default=defaults.max_tokens)
    s.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=defaults.top_k)
    s.add_argument("--top-p", type=float, default=defaults.top_p)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--json", action="store_true", help="print text, timing and memory as JSON")
    p.add_argument("--no-stream", action="store_true", help="print the text only when done")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def read_prompt(args: argparse.Namespace) -> str:
    parts = []
    for f in args.file:
        path = DEMO_DOCUMENT if str(f) == "demo" else f
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        parts.append(path.read_text(encoding="utf-8"))
    if args.prompt and args.prompt != "-":
        parts.append(args.prompt)
    elif not args.file or args.prompt == "-":
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end with Ctrl-D)...", file=sys.stderr)
        parts.append(sys.stdin.read())
    prompt = "\n\n".join(p.strip("\n") for p in parts)
    if not prompt.strip():
        raise PromptError("the prompt is empty: pass text, --file, or pipe it on stdin")
    return prompt


class PrefillProgress:
    """Progress of a long prefill on stderr (shown from 1024 tokens up), in token-layers: a
    chunked prefill runs every layer once per chunk."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, req, done: int, total: int) -> None:
        if not self.enabled or len(req.prompt_ids) < 1024:
            return
        width = 30
        bar = "#" * (width * done // total) + "-" * (width - width * done // total)
        elapsed = time.perf_counter() - self.start
        if not self.tty and done != total:
            return
        end = "\n" if done == total else ""
        pct = 100 * done // total
        print(f"\rprefill {len(req.prompt_ids)} tokens [{bar}] {pct}% {elapsed:.1f}s",
              end=end, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    params = SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
    )
    if not args.quiet:
        print("loading model...", file=sys.stderr, flush=True)
    with llm_from_args(args) as llm:  # closing it stops tensor-parallel workers
        return _generate(args, llm, prompt, params)


def _generate(args: argparse.Namespace, llm: LLM, prompt: str, params: SamplingParams) -> int:
    progress = PrefillProgress(not args.quiet)
    if args.json or args.no_stream:
        result = llm.generate(prompt, params, chat=args.chat, progress=progress)[0]
        if args.json:
            out = result.as_dict()
            out["model"] = str(llm.path)
            out["cache"] = llm.cache_config.method
            print(json.dumps(out, indent=2))
        else:
            print(result.text)
        return 0
    llm.engine.progress = progress
    for delta in llm.stream(prompt, params, chat=args.chat):
        print(delta, end="", flush=True)
    print()
    if not args.quiet:
        m = llm.last_result.metrics
        print(f"[{m['prompt_tokens']} prompt tokens, {m['generated_tokens']} generated, "
              f"ttft {m['ttft_s']:.2f}s, decode {m['decode_tokens_per_s'] or 0:.1f} tok/s, "
              f"finish: {llm.last_result.finish_reason}]", file=sys.stderr)
    return 0
