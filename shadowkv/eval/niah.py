"""Needle-in-a-haystack depth x length grid, as in ShadowKV's NIAH heat map.

ShadowKV hides `The special magic {city} number is: {7 digits}` in PG-19 text at 10 depths and
15 context lengths and asks for the number. PG-19 is not available offline, so the haystack is
any `Haystack` (we use the PG essays). ShadowKV inserts at token level (walking back to a
sentence end); we insert at character level, just after the last `.` or newline before the
depth point, so only `encode` is needed, and record the needle's measured token depth.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from shadowkv.eval import words
from shadowkv.eval.haystack import Haystack
from shadowkv.eval.ruler import (
    LENGTH_SLACK,
    ChatTemplate,
    Sample,
    Tokenizer,
    fit_size,
    resolve_chat_template,
    token_counter,
)

CITIES: tuple[str, ...] = (
    "Accra", "Addis Ababa", "Amsterdam", "Anchorage", "Athens", "Auckland", "Baghdad", "Bangkok",
    "Barcelona", "Beijing", "Beirut", "Belgrade", "Berlin", "Bogota", "Boston", "Brisbane",
    "Brussels", "Bucharest", "Budapest", "Buenos Aires", "Cairo", "Cape Town", "Caracas",
    "Casablanca", "Chicago", "Copenhagen", "Dakar", "Dallas", "Delhi", "Denver", "Dhaka", "Doha",
    "Dubai", "Dublin", "Edinburgh", "Florence", "Geneva", "Hanoi", "Havana", "Helsinki",
    "Hong Kong", "Honolulu", "Istanbul", "Jakarta", "Jerusalem", "Johannesburg", "Kabul",
    "Karachi", "Kathmandu", "Kyiv", "Kyoto", "Lagos", "Lima", "Lisbon", "London", "Los Angeles",
    "Madrid", "Manila", "Marrakesh", "Melbourne", "Mexico City", "Miami", "Milan", "Montreal",
    "Moscow", "Mumbai", "Munich", "Nairobi", "Naples", "New Orleans", "New York", "Oslo",
    "Ottawa", "Paris", "Perth", "Prague", "Quito", "Reykjavik", "Riga", "Rio de Janeiro", "Rome",
    "San Francisco", "Santiago", "Seattle", "Seoul", "Shanghai", "Singapore", "Stockholm",
    "Sydney", "Taipei", "Tallinn", "Tehran", "Tokyo", "Toronto", "Tunis", "Vancouver", "Venice",
    "Vienna", "Warsaw", "Wellington", "Zurich",
)
NIAH_NEEDLE = "\nThe special magic {city} number is: {number}\n"
NIAH_QUESTION = "What is the special magic {city} number?"
NIAH_TEMPLATE = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant).\n{context}\n\nQuestion: {question} Don't give "
    "information outside the document or repeat your findings. Keep your response short and "
    "direct. Answer: "
)
NIAH_MAX_NEW_TOKENS = 10


def niah_lengths(max_length: int, min_length: int = 16384, num_lengths: int = 15) -> list[int]:
    """`round(linspace(min_length, max_length, num_lengths))` (16K..128K in 8K steps at 128K)."""
    if num_lengths == 1:
        return [max_length]
    step = (max_length - min_length) / (num_lengths - 1)
    return [round(min_length + i * step) for i in range(num_lengths)]


def niah_depths(num_depths: int = 10) -> list[int]:
    """`round(linspace(0, 100, num_depths))` percent: 0, 11, 22, ..., 89, 100 for 10."""
    if num_depths == 1:
        return [50]
    return [round(100 * i / (num_depths - 1)) for i in range(num_depths)]


def generate_niah_samples(
    tokenizer: Tokenizer,
    haystack: Haystack,
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int = 42,
    chat_template: ChatTemplate | str | None = None,
) -> list[Sample]:
    """One sample per (length, depth), lengths outermost.

    Each prompt satisfies `num_tokens + NIAH_MAX_NEW_TOKENS <= length`; the haystack word count
    is fitted once per length and refitted for a cell that overflows or falls more than
    `LENGTH_SLACK` short.
    `metadata` holds `depth` (requested, percent), `depth_tokens` (measured: haystack tokens
    before the needle over all haystack tokens, percent), `needle_token_position` (in the
    prompt) and `city`.
    """
    count = token_counter(tokenizer)
    chat = resolve_chat_template(chat_template)
    samples: list[Sample] = []
    for length in lengths:
        budget = length - NIAH_MAX_NEW_TOKENS
        needle, question, *_ = _needle(random.Random(f"{seed}:niah:{length}:probe"))

        def probe_tokens(num_words: int, needle: str = needle, question: str = question) -> int:
            context, _ = _insert(haystack.text(num_words), needle, 50)
            return count(_prompt(chat, context, question))

        size = fit_size(probe_tokens, budget, 0, what=f"NIAH at {length} tokens")
        for depth in depths:
            samples.append(
                _cell(count, chat, haystack, size, length, depth, seed, index=len(samples))
            )
    return samples


def _cell(
    count: Callable[[str], int],
    chat: ChatTemplate,
    haystack: Haystack,
    size: int,
    length: int,
    depth: float,
    seed: int,
    index: int,
) -> Sample:
    needle, question, number, city = _needle(random.Random(f"{seed}:niah:{length}:{depth}"))
    budget = length - NIAH_MAX_NEW_TOKENS
    built: dict[int, tuple[str, int, str, int]] = {}

    def tokens_at(num_words: int) -> int:
        if num_words not in built:
            context, at = _insert(haystack.text(num_words), needle, depth)
            prompt = _prompt(chat, context, question)
            built[num_words] = context, at, prompt, count(prompt)
        return built[num_words][3]

    if not 0 <= budget - tokens_at(size) <= LENGTH_SLACK * length:
        size = fit_size(tokens_at, budget, 0, what=f"NIAH at {length} tokens", guess=size)
    context, at, prompt, num_tokens = built[size]
    haystack_tokens = count(context[:at] + context[at + len(needle) :])
    return Sample(
        task="niah",
        index=index,
        length_target=length,
        input=prompt,
        answer_prefix="",
        outputs=[number],
        max_new_tokens=NIAH_MAX_NEW_TOKENS,
        num_tokens=num_tokens,
        size=size,
        seed=seed,
        metadata={
            "depth": depth,
            "depth_tokens": round(100 * count(context[:at]) / max(haystack_tokens, 1), 2),
            "needle_token_position": count(prompt[: prompt.index(needle)]),
            "city": city,
        },
    )


def _needle(rng: random.Random) -> tuple[str, str, str, str]:
    city, number = rng.choice(CITIES), words.random_number(rng)
    needle = NIAH_NEEDLE.format(city=city, number=number)
    return needle, NIAH_QUESTION.format(city=city), number, city


def _insert(text: str, needle: str, depth: float) -> tuple[str, int]:
    """Insert after the last sentence end (`.` or newline) before `depth` percent of `text`;
    returns the new context and the needle's character offset in it."""
    text = text.strip()
    at = len(text) if depth >= 100 else int(len(text) * depth / 100)
    if at < len(text):
        at = max(text.rfind(".", 0, at), text.rfind("\n", 0, at)) + 1
    return text[:at] + needle + text[at:], at


def _prompt(chat: ChatTemplate, context: str, question: str) -> str:
    template = chat(NIAH_TEMPLATE)
    # The question first: essay text could contain a literal "{question}", a city name cannot.
    return template.replace("{question}", question, 1).replace("{context}", context, 1)


def heatmap_grid(
    results: Iterable[tuple[int, float, float]],
) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, scores[depth][length]) from `(length, depth, score)` triples; repeated
    cells are averaged and missing ones are NaN."""
    cells: dict[tuple[int, float], list[float]] = {}
    for length, depth, value in results:
        cells.setdefault((length, depth), []).append(value)
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = [
        [
            sum(cells[(n, d)]) / len(cells[(n, d)]) if (n, d) in cells else float("nan")
            for n in lengths
        ]
        for d in depths
    ]
    return lengths, depths, grid


def plot_heatmap(
    results: Iterable[tuple[int, float, float]], path: str | Path, title: str = "NIAH"
) -> Path:
    """Write a depth x length heat map (scores in [0, 1], red to green) to a PNG at `path`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_heatmap needs matplotlib: pip install matplotlib "
            "(or pip install 'shadowkv[plot]')"
        ) from err
    lengths, depths, grid = heatmap_grid(results)
    if not grid:
        raise ValueError("no NIAH results to plot")
    figure = Figure(figsize=(max(6.0, 0.6 * len(lengths) + 2), max(4.0, 0.4 * len(depths) + 1.5)))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    cmap = LinearSegmentedColormap.from_list("niah", ["#d73027", "#fee08b", "#1a9850"])
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (%)")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="Score")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png", dpi=120)
    return path


def _length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)
