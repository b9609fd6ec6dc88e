"""Run the nashalign CLI so that it stops at a named point and waits there to be killed.

    python pause_point.py POINT FD nashalign-arguments...

When the process reaches POINT it writes "paused\\n" to file descriptor FD (the write end of a pipe
the test passed in) and then blocks for good, so the test's SIGKILL lands exactly there, however
loaded the machine is. If the process ends without reaching POINT, the test reads end-of-file.

Points:
    sampling    the second sampler is about to be built (an online run: iteration 1's sampling)
    vllm-sampling  the vLLM sampler is about to generate for the second time (an online run with
                sampling.backend vllm, one engine for the run: π_1's samples for iteration 1, drawn
                for iteration 0's win rate after the engine took π_1's weights)
    judging     the python oracle vowel_judge:prefer_vowels is called for the first time
    checkpoint  a training phase's first checkpoint is complete (its final/ not yet written)
    mid-save    the second checkpoint's files are half written (model and optimizer, no marker yet)
"""

from __future__ import annotations

import functools
import os
import sys
import threading


def _pause_on_call(module, name: str, call: int, *, after: bool = False) -> None:
    """Replace module.name by a wrapper that pauses at its `call`-th call (before it runs, or
    after it returned)."""
    original = getattr(module, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and not after:
            _pause()
        result = original(*args, **kwargs)
        if calls[0] == call and after:
            _pause()
        return result

    setattr(module, name, wrapper)


def _pause() -> None:
    os.write(_FD, b"paused\n")
    threading.Event().wait()


def _install(point: str) -> None:
    if point == "sampling":
        import nashalign.sampling.engines

        _pause_on_call(nashalign.sampling.engines, "make_sampler", 2)
    elif point == "vllm-sampling":
        import nashalign.sampling.vllm_engine

        _pause_on_call(nashalign.sampling.vllm_engine.VLLMSampler, "generate", 2)
    elif point == "judging":
        import vowel_judge

        _pause_on_call(vowel_judge, "prefer_vowels", 1)
    elif point == "checkpoint":
        import nashalign.train.engine_checkpoint

        _pause_on_call(nashalign.train.engine_checkpoint, "save_training_checkpoint", 1, after=True)
    elif point == "mid-save":
        import nashalign.train.checkpoint

        # the RNG state is captured after the model and optimizer files, before the marker
        _pause_on_call(nashalign.train.checkpoint, "capture_rng_state", 2)
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    _FD = int(sys.argv[2])
    _install(sys.argv[1])
    from nashalign.cli import main

    sys.exit(main(sys.argv[3:]))
