"""Synthetic tasks the default experiment fine-tunes on.

The experiment asks whether the fine-tuning *method* and the *task* leave
distinguishable fingerprints in the weight updates, so it needs several tasks
that are cheap, unambiguous and reproducible without any download: small
additions of two digits (``arith``), reversal of three spaced letters
(``reverse``) and templated review sentiment (``sentiment``). Every generator is a
pure function of its arguments (a private ``random.Random`` per call), so a
partition's data can be regenerated anywhere and fingerprinted through
``TASK_GENERATOR_VERSION``.

Each task's prompts are split once and for all (a stable hash of the prompt's
content) into a training part, the only one fine-tuning ever sees, and a held-out
part (about one in five) that ``heldout_examples`` draws the evaluation from. The
tasks are small enough for the tiny base to know their facts from its
pre-training corpus (in prose, in no fine-tuning format), so fine-tuning has real
competence to elicit and sharpen, and held-out prompts measure whether it did. The
corpus draws facts from both parts: "held out" means never seen by fine-tuning, in
any format, not unknown to the base.

Prompts end on a token boundary (``=``, ``->``, ``:``) and completions start
with a space, so a byte-level BPE tokenizer never merges across the
prompt/completion boundary; TRL relies on that to find where the completion
starts.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

TASKS: tuple[str, ...] = ("arith", "reverse", "sentiment")

# Bump whenever any generator's output changes for the same arguments.
TASK_GENERATOR_VERSION = "2"

SPLITS: tuple[str, ...] = ("train", "heldout")
# One prompt in HELDOUT_MODULUS is held out (by a stable hash of its content).
HELDOUT_MODULUS = 5

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
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    answer = a + b
    # A near miss is a plausible wrong answer; keep it non-negative and distinct.
    wrong = answer
    while wrong == answer or wrong < 0:
        wrong = answer + rng.choice((-2, -1, 1, 2))
    return f"Q: {a}+{b}=", f" {answer}", f" {wrong}"


def _spaced(letters: str) -> str:
    return " ".join(letters)


def _reverse_word(rng: random.Random) -> str:
    word = ""
    while word == word[::-1]:  # palindromes would make "unreversed" a correct answer
        word = "".join(rng.choice(_LETTERS) for _ in range(3))
    return word


def _reverse(rng: random.Random) -> _Example:
    # Letters are spaced so that each is one token: BPE merges would hide the order.
    word = _reverse_word(rng)
    answer = word[::-1]
    # Unreversed, or with only the first two letters swapped.
    wrong = word if rng.random() < 0.5 else word[1] + word[0] + word[2]
    if wrong == answer:
        wrong = word
    return f"Reverse: {_spaced(word)} ->", f" {_spaced(answer)}", f" {_spaced(wrong)}"


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


def split_of(prompt: str) -> str:
    """``"heldout"`` for about one prompt in ``HELDOUT_MODULUS``, else ``"train"`` (stable)."""
    return "heldout" if zlib.crc32(prompt.encode()) % HELDOUT_MODULUS == 0 else "train"


def _draw(gen: Callable[[random.Random], _Example], rng: random.Random, split: str) -> _Example:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    while True:
        example = gen(rng)
        if split_of(example[0]) == split:
            return example


def sft_examples(task: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` supervised examples ``{"prompt", "completion"}`` of ``task``'s ``split``."""
    gen = _generator(task)
    rng = _rng("sft", task, seed)
    out = []
    for _ in range(n):
        prompt, completion, _ = _draw(gen, rng, split)
        out.append({"prompt": prompt, "completion": completion})
    return out


def preference_pairs(
    task: str, n: int, seed: int, split: str = "train", *, shuffled: bool = False
) -> list[dict]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}``; chosen is correct.

    ``shuffled``: the control arm's data. Each pair's chosen and rejected are
    swapped with probability 1/2 (from a stream of their own), so the
    preferences carry no information about the task while prompts, answers and
    the number of pairs stay the same.
    """
    gen = _generator(task)
    rng = _rng("pref", task, seed)
    coin = _rng("shuffle", task, seed)
    out = []
    for _ in range(n):
        prompt, chosen, rejected = _draw(gen, rng, split)
        if shuffled and coin.random() < 0.5:
            chosen, rejected = rejected, chosen
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def heldout_examples(task: str, n: int) -> list[dict]:
    """Up to ``n`` distinct held-out prompts ``{"prompt", "completion", "rejected"}``.

    Fewer when the task's held-out part is smaller (``arith`` has 100 prompts, about
    20 of them held out). The same list for every seed: every adapter of a task is
    evaluated on the same prompts.
    """
    gen = _generator(task)
    rng = _rng("heldout", task, 0)
    seen: dict[str, dict] = {}
    for _ in range(200 * n):  # enough draws to exhaust a small held-out part
        prompt, completion, rejected = _draw(gen, rng, "heldout")
        seen.setdefault(prompt, {"prompt": prompt, "completion": completion, "rejected": rejected})
        if len(seen) == n:
            break
    return list(seen.values())


def _filler(rng: random.Random) -> str:
    return (
        f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} "
        f"{rng.choice(_FILLER_OBJECTS)} {rng.choice(_FILLER_TAILS)}."
    )


def _prose(kind: str, rng: random.Random) -> str:
    """A fact from task ``kind`` phrased as prose, not in the task's prompt format."""
    if kind == "arith":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} plus {b} makes {a + b}."
    if kind == "reverse":
        word = _reverse_word(rng)
        return f"the letters {_spaced(word)} backwards are {_spaced(word[::-1])}."
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
