"""What each RULER task is: prompt text, fixed knobs and the task registry.

The chat templates, each task's template, answer prefix and needle line (wording from RULER, see
`shared/reference/ruler-spec.md`), the per-task constants (needle depths, vt hops and demo size,
cwe common-word count, fwe Zipf exponent), and `TASKS`, which maps a task name to its `TaskSpec`.
The prompt builders that use them live in `ruler_tasks`, the generator in `ruler`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ChatTemplate = Callable[[str], str]

CHAT_TEMPLATES: dict[str, str] = {
    "base": "{task_template}",
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>You are a helpful assistant"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>{task_template}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>"
    ),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
        "{task_template}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "glm": (
        "[gMASK]sop<|system|>\nYou are a helpful assistant\n<|user|> \n{task_template}"
        "<|assistant|>\n"
    ),
}
CHAT_TEMPLATES["yi"] = CHAT_TEMPLATES["qwen"]

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
    "the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = (
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"
)
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
)
FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
_QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words."
)
QA_TEMPLATE = (
    f"{_QA_INSTRUCTION}\n\nThe following are given documents.\n\n{{context}}\n\n"
    f"{_QA_INSTRUCTION}\n\nQuestion: {{query}}"
)
QA_ANSWER_PREFIX = " Answer:"

# Needle depths in percent: round(linspace(0, 100, 40)).
DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))
VT_HOPS = 4
VT_DEMO_TOKENS = 500
CWE_NUM_COMMON = 10
FWE_ALPHA = 2.0


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "noise" | "essay" | "needle" (distractor needle lines)
    key_type: str  # "words" | "numbers" | "uuids"
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "niah" | "vt" | "cwe" | "fwe" | "qa"
    max_new_tokens: int
    niah: NiahConfig | None = None
    qa_dataset: str | None = None


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("niah_single_1", "niah", 128, NiahConfig("noise", "words", "numbers")),
        TaskSpec("niah_single_2", "niah", 128, NiahConfig("essay", "words", "numbers")),
        TaskSpec("niah_single_3", "niah", 128, NiahConfig("essay", "words", "uuids")),
        TaskSpec("niah_multikey_1", "niah", 128, NiahConfig("essay", "words", "numbers", 4)),
        TaskSpec("niah_multikey_2", "niah", 128, NiahConfig("needle", "words", "numbers")),
        TaskSpec("niah_multikey_3", "niah", 128, NiahConfig("needle", "uuids", "uuids")),
        TaskSpec("niah_multivalue", "niah", 128, NiahConfig("essay", "words", "numbers", 1, 4)),
        TaskSpec("niah_multiquery", "niah", 128, NiahConfig("essay", "words", "numbers", 4, 1, 4)),
        TaskSpec("vt", "vt", 30),
        TaskSpec("cwe", "cwe", 120),
        TaskSpec("fwe", "fwe", 50),
        TaskSpec("qa_1", "qa", 32, qa_dataset="squad"),
        TaskSpec("qa_2", "qa", 32, qa_dataset="hotpotqa"),
    )
}
# ShadowKV's RULER suite: all tasks but niah_multikey_3 and cwe.
SHADOWKV_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t not in ("niah_multikey_3", "cwe"))
