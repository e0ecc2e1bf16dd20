"""User reward functions for the GRPO tests, loaded by dotted path (grpo.rewards)."""


def ascii_share(completions, lengths, **kwargs):
    """Share of a completion's characters that are printable ASCII letters: dense, and a
    random model starts far from the maximum."""
    return [sum(c.isascii() and c.isalpha() for c in text) / max(n, 1) for text, n in zip(completions, lengths)]


def constant_on_plus(prompts, completions, lengths, **kwargs):
    """1.0 for every completion of a prompt with '+' (an all-equal group), the dense
    ascii_share otherwise."""
    dense = ascii_share(completions, lengths)
    return [1.0 if "+" in p else d for p, d in zip(prompts, dense)]


not_callable = 3
