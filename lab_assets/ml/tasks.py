"""Synthetic tasks the default experiment fine-tunes on.

The experiment asks whether the fine-tuning *method* and the *task* leave
distinguishable fingerprints in the weight updates, so it needs several tasks
that are cheap, unambiguous and reproducible without any download: small
additions (``arith``), letter-string reversal (``reverse``) and templated
review sentiment (``sentiment``). Every generator is a pure function of its
arguments (a private ``random.Random`` per call), so a partition's data can be
regenerated anywhere and fingerprinted through ``TASK_GENERATOR_VERSION``.

Prompts end on a token boundary (``=``, ``->``, ``:``) and completions start
with a space, so a byte-level BPE tokenizer never merges across the
prompt/completion boundary; TRL relies on that to find where the completion
starts.
"""

from __future__ import annotations

import random
from collections.abc import Callable

TASKS: tuple[str, ...] = ("arith", "reverse", "sentiment")

# Bump whenever any generator's output changes for the same arguments.
TASK_GENERATOR_VERSION = "1"

_LETTERS = "abcdefghijklmnopqrstuvwxyz"

_POSITIVE = (
    "great",
    "wonderful",
    "delightful",
    "excellent",
    "charming",
    "superb",
    "lovely",
    "brilliant",
    "pleasant",
    "fantastic",
)
_NEGATIVE = (
    "terrible",
    "awful",
    "boring",
    "dreadful",
    "disappointing",
    "horrible",
    "dull",
    "poor",
    "tedious",
    "miserable",
)
_SUBJECTS = (
    "movie",
    "book",
    "meal",
    "concert",
    "hotel",
    "service",
    "game",
    "show",
    "trip",
    "album",
)
_SENTIMENT_TEMPLATES = (
    "the {subject} was {adj}.",
    "i found the {subject} {adj}.",
    "what a {adj} {subject}.",
    "honestly, the {subject} felt {adj}.",
    "overall a {adj} {subject}.",
)

_FILLER_SUBJECTS = ("the cat", "a farmer", "my friend", "the river", "an old man", "the teacher")
_FILLER_VERBS = ("walks to", "looks at", "talks about", "runs past", "thinks of", "waits near")
_FILLER_OBJECTS = ("the market", "a small house", "the green hill", "the library", "a red door")
_FILLER_TAILS = ("in the morning", "after lunch", "every day", "at night", "before the rain")

# (prompt, completion, rejected completion)
_Example = tuple[str, str, str]


def _arith(rng: random.Random) -> _Example:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    answer = a + b
    # A near miss is a plausible wrong answer; keep it non-negative and distinct.
    wrong = answer
    while wrong == answer or wrong < 0:
        wrong = answer + rng.choice((-10, -2, -1, 1, 2, 10))
    return f"Q: {a}+{b}=", f" {answer}", f" {wrong}"


def _reverse(rng: random.Random) -> _Example:
    word = ""
    while word == word[::-1]:  # palindromes would make "unreversed" a correct answer
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    answer = word[::-1]
    if rng.random() < 0.5:
        wrong = word
    else:
        # Partially reversed: only the first half is reversed.
        half = len(word) // 2
        wrong = word[:half][::-1] + word[half:]
        if wrong == answer:
            wrong = word
    return f"Reverse: {word} ->", f" {answer}", f" {wrong}"


def _sentiment(rng: random.Random) -> _Example:
    positive = rng.random() < 0.5
    adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
    sentence = rng.choice(_SENTIMENT_TEMPLATES).format(subject=rng.choice(_SUBJECTS), adj=adj)
    label, flipped = ("positive", "negative") if positive else ("negative", "positive")
    return f"Review: {sentence} Sentiment:", f" {label}", f" {flipped}"


_GENERATORS: dict[str, Callable[[random.Random], _Example]] = {
    "arith": _arith,
    "reverse": _reverse,
    "sentiment": _sentiment,
}


def _generator(task: str) -> Callable[[random.Random], _Example]:
    try:
        return _GENERATORS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


def _rng(kind: str, task: str, seed: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across
    # processes (unlike hash()) and gives each (kind, task, seed) its own stream.
    return random.Random(f"{kind}:{task}:{seed}")


def sft_examples(task: str, n: int, seed: int) -> list[dict]:
    """``n`` supervised examples ``{"prompt", "completion"}`` for ``task``."""
    gen = _generator(task)
    rng = _rng("sft", task, seed)
    out = []
    for _ in range(n):
        prompt, completion, _ = gen(rng)
        out.append({"prompt": prompt, "completion": completion})
    return out


def preference_pairs(task: str, n: int, seed: int) -> list[dict]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}``; chosen is correct."""
    gen = _generator(task)
    rng = _rng("pref", task, seed)
    out = []
    for _ in range(n):
        prompt, chosen, rejected = gen(rng)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _filler(rng: random.Random) -> str:
    return (
        f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} "
        f"{rng.choice(_FILLER_OBJECTS)} {rng.choice(_FILLER_TAILS)}."
    )


def _prose(kind: str, rng: random.Random) -> str:
    """A fact from task ``kind`` phrased as prose, not in the task's prompt format."""
    if kind == "arith":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"{a} plus {b} makes {a + b}."
    if kind == "reverse":
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
        return f"the word {word} backwards is {word[::-1]}."
    if kind == "sentiment":
        positive = rng.random() < 0.5
        adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
        sentence = rng.choice(_SENTIMENT_TEMPLATES).format(subject=rng.choice(_SUBJECTS), adj=adj)
        return f"{sentence} that is a {'positive' if positive else 'negative'} review."
    return _filler(rng)


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """``n`` lines mixing facts from every task with generic filler sentences.

    Used to train the base model's tokenizer and to pre-train it. Task facts
    appear as prose ("3 plus 4 makes 7."), never in the prompt format the
    fine-tuning data uses ("Q: 3+4=" -> " 7"): the base model knows the
    content, and fine-tuning has a real behaviour to teach (answer in the
    format), which gives the weight updates a clear task-specific signal.
    """
    rng = _rng("corpus", "*", seed)
    kinds = (*TASKS, "filler")
    # Round-robin guarantees every kind appears even for tiny n.
    lines = [_prose(kinds[i % len(kinds)], rng) for i in range(n)]
    rng.shuffle(lines)
    return lines
