"""Rewards for reasoning RL: each component scores a batch of completions; the total is
their weighted sum, and every component is logged on its own.

Built in (names in ``grpo.rewards``):

    accuracy   the task's own verifier (reasoning-gym ``score_answer``) on the text between
               <answer> and </answer>; 0 when the tags are missing. In [0, 1].
    format     1 when the completion is exactly <think>...</think> <answer>...</answer>
               (whitespace between and around the blocks allowed), else 0.
    overlong   DAPO's soft overlong punishment on the completion length L (tokens), with
               L_max = grpo.max_new_tokens and L_cache = grpo.overlong_buffer:
               0 for L <= L_max - L_cache, falling linearly to -1 at L_max.

Any other name is a user function given by dotted path, ``package.module:function`` or
``package.module.function``, called once per batch with keyword arguments (as TRL calls
reward functions) and returning one float per completion::

    def my_reward(prompts, completions, answers, tasks, entries, lengths, **kwargs) -> list[float]
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..data import Example

BUILT_IN = ("accuracy", "format", "overlong")
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


@dataclass
class Completion:
    """One sampled completion: its text (eos removed), token count, and whether it was
    cut at max_new_tokens (no eos, no stop string)."""

    text: str
    length: int
    truncated: bool


def accuracy(examples: list[Example], completions: list[Completion], scorer: Callable) -> list[float]:
    """``scorer(example, text)`` extracts the answer itself and gives 0 when the tags are missing."""
    return [float(scorer(ex, c.text)) for ex, c in zip(examples, completions)]


def format_reward(completions: list[Completion]) -> list[float]:
    return [1.0 if _FORMAT.fullmatch(c.text) else 0.0 for c in completions]


def overlong(completions: list[Completion], max_len: int, buffer: int) -> list[float]:
    """DAPO eq. 13: 0 below L_max - L_cache, then (L_max - L_cache - L) / L_cache, -1 beyond L_max."""
    start = max_len - buffer
    out = []
    for c in completions:
        if c.length <= start:
            out.append(0.0)
        elif c.length <= max_len:
            out.append((start - c.length) / buffer)
        else:
            out.append(-1.0)
    return out


def load_function(path: str) -> Callable:
    """The callable named by ``module:function`` or ``module.function``; ValueError naming
    what is missing."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"reward {path!r}: expected a built-in ({', '.join(BUILT_IN)}) or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import module {module!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"reward {path!r}: module {module!r} has no attribute {name!r}") from None
    if not callable(fn):
        raise ValueError(f"reward {path!r}: {module}.{name} is not callable")
    return fn


class Rewards:
    """The weighted components of ``weights`` ({name or dotted path: weight})."""

    def __init__(self, weights: dict[str, float], scorer: Callable, max_new_tokens: int, overlong_buffer: int):
        if not weights:
            raise ValueError("grpo.rewards is empty: name at least one reward, e.g. {accuracy = 1.0}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.scorer = scorer
        self.max_new_tokens = max_new_tokens
        self.overlong_buffer = overlong_buffer
        if "overlong" in weights and not 0 < overlong_buffer <= max_new_tokens:
            raise ValueError(
                f"grpo.overlong_buffer = {overlong_buffer} must be in 1..grpo.max_new_tokens ({max_new_tokens})"
            )
        self.user = {k: load_function(k) for k in weights if k not in BUILT_IN}

    def correct(self, examples: list[Example], completions: list[Completion], parts: dict) -> list[float]:
        """The verifier's score per completion (1.0 = right), whether or not accuracy is a reward here."""
        return parts["accuracy"] if "accuracy" in parts else accuracy(examples, completions, self.scorer)

    def __call__(self, examples: list[Example], completions: list[Completion]) -> tuple[list[float], dict]:
        """Total reward per completion, and each component's list of values."""
        parts: dict[str, list[float]] = {}
        for name in self.weights:
            if name == "accuracy":
                values = accuracy(examples, completions, self.scorer)
            elif name == "format":
                values = format_reward(completions)
            elif name == "overlong":
                values = overlong(completions, self.max_new_tokens, self.overlong_buffer)
            else:
                values = self.user[name](
                    prompts=[ex.prompt for ex in examples],
                    completions=[c.text for c in completions],
                    answers=[ex.answer for ex in examples],
                    tasks=[ex.task for ex in examples],
                    entries=[ex.entry for ex in examples],
                    lengths=[c.length for c in completions],
                )
                values = [float(v) for v in values]
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            bad = [v for v in values if not math.isfinite(v)]
            if bad:
                raise ValueError(f"reward {name!r} returned a non-finite value ({bad[0]})")
            parts[name] = values
        total = [sum(self.weights[n] * parts[n][i] for n in parts) for i in range(len(completions))]
        return total, parts
