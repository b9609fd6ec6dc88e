"""A `python` oracle plugin for the multi-process tests: the crash tests' deterministic preference
(vowel_judge.prefer_vowels), and a record of every call: one JSON line
{"rows": n} per call in <record_dir>/judge-rank<r>.jsonl, r the calling process's RANK (0 outside
accelerate launch)."""

import json
import os
from pathlib import Path

from vowel_judge import prefer_vowels


def recorded_vowels(prompts, first, second, record_dir):
    path = Path(record_dir) / f"judge-rank{os.environ.get('RANK', '0')}.jsonl"
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"rows": len(first)}) + "\n")
    return prefer_vowels(prompts, first, second)
