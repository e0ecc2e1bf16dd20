"""Synthetic verifiable reasoning tasks from reasoning-gym, rendered as prompt/completion.

Every example is rendered the same way::

    prompt     = question.strip() + "\\n"
    completion = "<think>" + reasoning + "</think>\\n<answer>" + answer + "</answer>"

where ``reasoning`` is ``f"{expression} = {answer}"`` for arithmetic-like tasks whose
metadata carries the ``expression`` that evaluates to the answer, and empty otherwise.

Seeds. reasoning-gym generates item ``idx`` of a dataset with seed ``s`` from
``Random(s + idx)``, so datasets with nearby seeds share items. ReasoningTasks therefore
maps the user's seed to a base ``b`` in [0, 2**30) and gives each use its own range:
train items come from seeds ``b + [0, 2**30)``, replacements for train items that collide
with the held-out set from ``b + 2**30 + [0, 2**30)``, and the held-out split from
``b + 2**31 + [0, heldout_size)``; every seed stays below 2**32 as numpy requires.
Train items are generated in chunks of ``CHUNK`` (one reasoning-gym dataset per chunk),
so datasets that precompute all their items stay cheap; for the usual ``seed + idx``
datasets this gives exactly the items of one huge dataset.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from typing import Any

# Easy settings a ~5M-parameter model learns in minutes; task_kwargs override them key by key.
EASY_DEFAULTS: dict[str, dict[str, Any]] = {
    # keep allow_parentheses=True: its expressions are evaluated; the simple generator of
    # reasoning-gym 0.1.25 writes the pre-division divisor into the question (wrong answers)
    "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2),
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
}
SPLITS = ("train", "heldout")
CHUNK = 10_000  # train items per generated reasoning-gym dataset
REGION = 2**30  # seeds per region: train, replacements, held-out
MAX_TRIES = 1000  # replacements tried before declaring the held-out set covers the task
_CACHED_CHUNKS = 8


@dataclass
class Example:
    """One rendered task: what the model sees, what it should write, and how to score it."""

    prompt: str
    completion: str
    answer: str
    task: str
    entry: dict = field(repr=False)  # the reasoning-gym entry, passed back to score_answer


def _rg():
    import reasoning_gym

    return reasoning_gym


def task_names() -> list[str]:
    """All task names reasoning-gym knows, sorted."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


REASONING = ("expression", "columns")
_TWO_TERMS = re.compile(r"\s*(\d+)\s*([+-])\s*(\d+)\s*")


def column_steps(a: int, op: str, b: int) -> str | None:
    """Column arithmetic for ``a op b`` (non-negative integers), least significant digit
    first: ``x+y+c=s`` per column for a sum (s >= 10 carries 1), ``x-y-c=d`` for a
    difference (d < 0 borrows 1; the digit is d + 10), then ``|`` and the result.
    ``b > a`` in a difference is written ``-(b-a)`` and computed as b - a."""
    sign = ""
    if op == "-" and b > a:
        sign, a, b = "-", b, a
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    da, db = da.ljust(n, "0"), db.ljust(n, "0")
    steps, c = [], 0
    for x, y in zip(da, db):
        if op == "+":
            v = int(x) + int(y) + c
            steps.append(f"{x}+{y}+{c}={v}")
            c = v // 10
        else:
            v = int(x) - int(y) - c
            steps.append(f"{x}-{y}-{c}={v}")
            c = int(v < 0)
    result = a + b if op == "+" else a - b
    head = f"-({a}-{b}) " if sign else ""
    return f"{head}{' '.join(steps)} |{sign}{result}"


def render(task: str, entry: dict, reasoning: str = "expression") -> Example:
    """The Example for a reasoning-gym entry, in the fixed prompt/completion format.

    ``reasoning="columns"`` writes a two-term sum or difference of non-negative integers
    as column arithmetic (``column_steps``), a chain of thought a small model can follow;
    other entries keep ``"expression"``: the expression, ``=``, the answer."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning {reasoning!r} is not one of {REASONING}")
    answer = "" if entry.get("answer") is None else str(entry["answer"])
    expression = (entry.get("metadata") or {}).get("expression")
    # countdown's "expression" is the answer itself: "x = x" would teach nothing
    reasoning_text = f"{expression} = {answer}" if isinstance(expression, str) and expression != answer else ""
    m = _TWO_TERMS.fullmatch(expression) if reasoning == "columns" and isinstance(expression, str) else None
    if m is not None:
        a, op, b = int(m[1]), m[2], int(m[3])
        if str(a + b if op == "+" else a - b) == answer:  # only where the column result is the task's answer
            reasoning_text = column_steps(a, op, b)
    reasoning = reasoning_text
    return Example(
        prompt=entry["question"].strip() + "\n",
        completion=f"<think>{reasoning}</think>\n<answer>{answer}</answer>",
        answer=answer,
        task=task,
        entry=entry,
    )


def extract_answer(text: str) -> str | None:
    """The text between the first ``<answer>`` and the next ``</answer>``, stripped of
    surrounding whitespace; None when either tag is missing."""
    start = text.find("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    if end < 0:
        return None
    return text[start:end].strip()


@cache
def _scorer(task: str):
    return _rg().get_score_answer_fn(task)


def score(example: Example, generated: str) -> float:
    """Reward in [0, 1] for ``generated``: reasoning-gym's ``score_answer`` of the task,
    applied to the extracted answer; 0.0 when the ``<answer>`` tags are missing.

    Uses the scorer of a default-configured dataset of ``example.task``; reasoning-gym's
    scorers read what they need from ``example.entry``. Raises ValueError for a task
    name reasoning-gym does not know.
    """
    extracted = extract_answer(generated)
    if extracted is None:
        return 0.0
    return float(_scorer(example.task)(extracted, example.entry))


def _refuse_known_bad(kwargs: dict[str, dict]) -> None:
    """Raise ValueError for settings under which reasoning-gym 0.1.25 generates wrong answers."""
    ba = kwargs.get("basic_arithmetic")
    if ba is not None and ba.get("allow_parentheses") is False and "/" in ba.get("operators", ("/",)):
        raise ValueError(
            "task_kwargs['basic_arithmetic']: allow_parentheses=False with '/' in operators makes "
            "reasoning-gym write questions whose answers are wrong; keep allow_parentheses=True "
            "or drop '/' from operators"
        )


def _mix(seed: int) -> int:
    """A seed spread over [0, REGION): neighbouring user seeds give far-apart streams."""
    return (seed * 0x9E3779B1) % REGION


class ReasoningTasks:
    """Interleaved reasoning-gym tasks: example ``i`` is task ``names[i % len(names)]``.

    ``split="heldout"`` has exactly ``heldout_size`` examples (``len()``), generated from
    seeds the train split never uses. ``split="train"`` is unbounded (``len()`` raises
    TypeError); a train example whose question text occurs in the held-out set of the same
    task is replaced by the next candidate from a separate seed range, so held-out
    accuracy is never memorisation. Task-local positions wrap after 2**30 train examples.

    ``example(i)`` depends only on (names, seed, split, heldout_size, task_kwargs, i).
    Raises ValueError listing the valid names for an unknown task, naming the split for an
    unknown split, and reasoning-gym's config errors prefixed with the task name.
    """

    def __init__(
        self,
        names: list[str],
        seed: int = 0,
        split: str = "train",
        heldout_size: int = 200,
        task_kwargs: dict[str, dict] | None = None,
        reasoning: str = "expression",
    ):
        if isinstance(names, str):
            names = [names]
        names = list(names)
        valid = task_names()
        unknown = [n for n in names if n not in valid]
        if not names or unknown:
            raise ValueError(f"unknown reasoning-gym task(s) {unknown or names}; valid names: {', '.join(valid)}")
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if not len(names) <= heldout_size < REGION:
            raise ValueError(
                f"heldout_size {heldout_size} must be in {len(names)}..{REGION - 1} (at least one per task)"
            )
        extra = set(task_kwargs or {}) - set(names)
        if extra:
            raise ValueError(f"task_kwargs names tasks not in names={names}: {sorted(extra)}")
        if reasoning not in REASONING:
            raise ValueError(f"reasoning {reasoning!r} is not one of {REASONING}")
        self.reasoning = reasoning
        self.names = names
        self.seed = int(seed)
        self.split = split
        self.heldout_size = heldout_size
        self.kwargs = {n: {**EASY_DEFAULTS.get(n, {}), **(task_kwargs or {}).get(n, {})} for n in names}
        _refuse_known_bad(self.kwargs)
        self._base = _mix(self.seed)
        self._chunks: OrderedDict[tuple[str, int], Any] = OrderedDict()
        # the held-out split of each task: its positions i with i % n == t
        n = len(names)
        self._heldout = {
            name: self._dataset(name, self._base + 2 * REGION, len(range(t, heldout_size, n)))
            for t, name in enumerate(names)
        }
        self._heldout_questions = {name: {e["question"].strip() for e in ds} for name, ds in self._heldout.items()}

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the train split of ReasoningTasks is unbounded; only the heldout split has a length")
        return self.heldout_size

    def __repr__(self) -> str:
        return f"ReasoningTasks({self.names}, seed={self.seed}, split={self.split!r})"

    def _dataset(self, name: str, seed: int, size: int):
        try:
            return _rg().create_dataset(name, seed=seed, size=size, **self.kwargs[name])
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"reasoning-gym task {name!r} with {self.kwargs[name]}: {e}") from e

    def _item(self, name: str, region: int, position: int) -> dict:
        """Item ``position`` of the seed range ``region`` (0 train, 1 replacements)."""
        chunk, idx = divmod(position % REGION, CHUNK)
        key = (name, region * REGION + chunk)
        ds = self._chunks.get(key)
        if ds is None:
            ds = self._dataset(name, self._base + region * REGION + chunk * CHUNK, CHUNK)
            self._chunks[key] = ds
            if len(self._chunks) > _CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(key)
        return ds[idx]

    def example(self, i: int) -> Example:
        """Example ``i`` of this split. Raises IndexError for i < 0, or i >= heldout_size
        on the held-out split; RuntimeError when no train example outside the held-out set
        is found in MAX_TRIES candidates (the task has too few distinct questions)."""
        if i < 0 or (self.split == "heldout" and i >= self.heldout_size):
            size = self.heldout_size if self.split == "heldout" else "unbounded"
            raise IndexError(f"example {i} is outside the {self.split} split (size {size})")
        name = self.names[i % len(self.names)]
        j = i // len(self.names)
        if self.split == "heldout":
            return render(name, self._heldout[name][j], self.reasoning)
        entry = self._item(name, 0, j)
        tries = 0
        while entry["question"].strip() in self._heldout_questions[name]:
            tries += 1
            if tries > MAX_TRIES:
                raise RuntimeError(
                    f"task {name!r}: no train question outside the held-out set in {MAX_TRIES} tries; "
                    f"the task has too few distinct questions for heldout_size={self.heldout_size}"
                )
            entry = self._item(name, 1, (j * 0x9E3779B1 + tries * 0x85EBCA77) % REGION)
        return render(name, entry, self.reasoning)

    def __getitem__(self, i: int) -> Example:
        return self.example(i)

    def score(self, example: Example, generated: str) -> float:
        """As the module's ``score``, using this object's configured dataset's scorer."""
        extracted = extract_answer(generated)
        if extracted is None:
            return 0.0
        return float(self._heldout[example.task].score_answer(extracted, example.entry))
