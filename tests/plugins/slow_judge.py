"""A `python` oracle plugin for the crash tests: a deterministic general preference that is slow, and
that announces it has started (so a test can kill the process while it is judging)."""

import os
import time
from pathlib import Path

import numpy as np


def prefer_vowels(prompts, first, second):
    """P(a ≻ b) = σ(vowels(a) − vowels(b)) / 2 + 1/4·[len(a) < len(b)] − 1/4·[len(a) > len(b)] (clipped)."""
    marker = os.environ.get("NASHALIGN_TEST_JUDGE_MARKER")
    if marker:
        Path(marker).touch()
    time.sleep(float(os.environ.get("NASHALIGN_TEST_JUDGE_DELAY", "0")))

    def vowels(text):
        return sum(ch in "aeiou" for ch in text)

    out = []
    for a, b in zip(first, second):
        p = 0.5 / (1 + np.exp(-(vowels(a) - vowels(b)))) + 0.25 + 0.25 * np.sign(len(b) - len(a))
        out.append(float(np.clip(p, 0.0, 1.0)))
    return np.array(out)
