"""nashalign.online.sharding in one process (the degenerate case of the same code), and the sampling stage's
per-process shard files. The 2-process behaviour is tested end to end in test_online_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nashalign import NashalignError
from nashalign.data.artifacts import read_jsonl, write_jsonl
from nashalign.judges.oracles import PythonOracle
from nashalign.online.sharding import SplitOracle, process_state, row_range


@given(size=st.integers(0, 300), processes=st.integers(1, 9))
def test_row_ranges_partition_the_rows_in_order(size, processes):
    """Process ranges, in rank order, are consecutive and cover 0..size-1 exactly once; their lengths
    differ by at most one, the longer ones first."""
    ranges = [row_range(size, rank, processes) for rank in range(processes)]
    assert [row for part in ranges for row in part] == list(range(size))
    lengths = [len(part) for part in ranges]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def _length_judge(prompts, first, second):
    """q(a, b) = 0.8 if a is shorter than b, 0.3 if longer, 0.5 if equally long (position-free)."""
    return np.array([0.8 if len(a) < len(b) else 0.3 if len(a) > len(b) else 0.5 for a, b in zip(first, second)])


def test_split_oracle_in_one_process_answers_as_its_oracle():
    """One process answers every row: the same probabilities and counts as the oracle itself
    (identical texts are ½ without a judge call); no score method when the oracle has none."""
    inner, reference = PythonOracle(_length_judge), PythonOracle(_length_judge)
    split = SplitOracle(inner, process_state(), split=True)
    prompts, first, second = ["p"] * 4, ["a", "bbb", "cc", "same"], ["bb", "c", "dd", "same"]
    np.testing.assert_array_equal(split.prob(prompts, first, second), reference.prob(prompts, first, second))
    assert split.counts.comparisons == 4
    assert split.counts.judge_calls == reference.counts.judge_calls == 6  # 3 differing pairs, both orders
    assert not hasattr(split, "score")


def test_split_oracle_raises_the_oracles_user_error():
    def broken(prompts, first, second):
        return np.full(len(first), 1.5)

    with pytest.raises(NashalignError, match="probabilities must lie in"):
        SplitOracle(PythonOracle(broken), process_state(), split=True).prob(["p"], ["a"], ["b"])
    with pytest.raises(NashalignError, match="probabilities must lie in"):
        SplitOracle(PythonOracle(broken), process_state(), split=False).prob(["p"], ["a"], ["b"])


def test_split_oracle_keeps_a_reward_models_score():
    class Scoring(PythonOracle):
        def score(self, prompts, responses):
            return np.array([float(len(text)) for text in responses])

    split = SplitOracle(Scoring(_length_judge), process_state(), split=True)
    np.testing.assert_array_equal(split.score(["p", "p"], ["ab", "abcd"]), [2.0, 4.0])


def test_a_finished_sampling_shard_is_kept_and_merged(tmp_path):
    """An interrupted run's complete shard is not sampled again: generations.jsonl is merged from it
    in (prompt, sample) order (the policy path does not even exist, so sampling would fail), and
    every shard file, also a stale one of another process count, is removed, also when the merged
    file already exists."""
    from nashalign.config import from_mapping
    from nashalign.online.loop import OnlineConfig, _generate
    from nashalign.sampling.engines import SamplerPool

    config = from_mapping(OnlineConfig, {"model": {"name_or_path": str(tmp_path / "absent")},
                                         "sampling": {"samples_per_prompt": 2}})
    rows = [{"prompt_index": p, "sample_index": j, "text": f"{p}.{j}", "token_ids": [p, j], "finish_reason": "stop"}
            for p in (1, 0) for j in (1, 0)]
    path = tmp_path / "generations.jsonl"
    write_jsonl(tmp_path / "generations.shard-0-of-1.jsonl", rows)
    write_jsonl(tmp_path / "generations.shard-2-of-3.jsonl", rows[:1])
    groups = _generate(path, str(tmp_path / "absent"), None, ["first", "second"], config, 0, process_state(), False,
                       SamplerPool())
    assert [[g["text"] for g in group] for group in groups] == [["0.0", "0.1"], ["1.0", "1.1"]]
    assert [row["text"] for row in read_jsonl(path)] == ["0.0", "0.1", "1.0", "1.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generations.jsonl"]
    # A shard left by a kill between the merge and the clean-up goes on the next run, which samples nothing.
    write_jsonl(tmp_path / "generations.shard-0-of-1.jsonl", rows[:1])
    again = _generate(path, str(tmp_path / "absent"), None, ["first", "second"], config, 0, process_state(), False,
                       SamplerPool())
    assert again == groups and sorted(p.name for p in tmp_path.iterdir()) == ["generations.jsonl"]
