"""A `python` oracle plugin for the CLI and crash tests: a deterministic general preference (the crash
tests stop the process inside it through tests/plugins/pause_point.py)."""

import numpy as np


def prefer_vowels(prompts, first, second):
    """P(a ≻ b) = σ(vowels(a) − vowels(b)) / 2 + 1/4·[len(a) < len(b)] − 1/4·[len(a) > len(b)] (clipped)."""
    def vowels(text):
        return sum(ch in "aeiou" for ch in text)

    out = []
    for a, b in zip(first, second):
        p = 0.5 / (1 + np.exp(-(vowels(a) - vowels(b)))) + 0.25 + 0.25 * np.sign(len(b) - len(a))
        out.append(float(np.clip(p, 0.0, 1.0)))
    return np.array(out)
