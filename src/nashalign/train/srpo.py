"""SRPO's second role, revision: the revision prompt T(x, y), the six scored sequences of a pair, and
self-revision at inference (generate an answer, then revise it N times with the same model).

The revision prompt continues the conversation: the answer y is the assistant's turn and the next
user turn asks for a revision (`revision_instruction`), so for a chat model

    T(x, y) = x + y + <end of the assistant turn> + <user turn: instruction> + <generation prompt>

with the glue after y rendered by the tokenizer's own chat template. A tokenizer without a chat
template gets `x + y + "\\n\\n" + instruction + "\\n"`. A `revision_template` (a format string with
{prompt} and {response}) replaces both. Training and inference build T from the same texts (the
prompt as rendered for the policy, the response decoded without its final stop token), so the model is asked to
revise exactly in the form it was trained on.

Offline SRPO scores a pair (x, y_w, y_l) as three pairs sharing the responses: (x, y_w, y_l),
(T(x, y_l), y_w, y_l) and (T(x, y_w), y_w, y_l); each is an ordinary `TokenizedPair`, so the
reference log-probs of all six sequences go through the log-prob cache and the policy scores them in
one forward pass (collated or packed).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nashalign import NashalignError
from nashalign.data.tokenization import TokenizedPair

PROMPT_FIELD, RESPONSE_FIELD = "{prompt}", "{response}"
_PROMPT_SENTINEL, _RESPONSE_SENTINEL = "\x00nashalign-prompt\x00", "\x00nashalign-response\x00"


def template_problem(template: str) -> str | None:
    """Why `template` is not a str.format template with exactly {prompt} and {response}, or None."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        return f"not a valid format string ({error})"
    if used != {"prompt", "response"}:
        return f"expected a format string using exactly {{prompt}} and {{response}}, it uses {sorted(used)}"
    return None


@dataclass(frozen=True)
class RevisionFormat:
    """How a (prompt text, response text) becomes a revision prompt for one tokenizer."""

    template: str  # a format string with {prompt} and {response}

    def text(self, prompt: str, response: str) -> str:
        return self.template.format(prompt=prompt, response=response)


def revision_format(tokenizer, instruction: str = "Improve this answer.", template: str | None = None) -> RevisionFormat:
    """The revision prompt format of `tokenizer` (see the module docstring)."""
    if template is not None:
        problem = template_problem(template)
        if problem:
            raise NashalignError(f"loss.revision_template: {problem}")
        return RevisionFormat(template)
    if not getattr(tokenizer, "chat_template", None):
        return RevisionFormat(PROMPT_FIELD + RESPONSE_FIELD + "\n\n" + _escape(instruction) + "\n")
    # Render a conversation with sentinels and keep what the template writes after the answer.
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PROMPT_SENTINEL}, {"role": "assistant", "content": _RESPONSE_SENTINEL},
         {"role": "user", "content": instruction}],
        tokenize=False, add_generation_prompt=True,
    )
    if rendered.count(_RESPONSE_SENTINEL) != 1:
        raise NashalignError("the chat template does not render an assistant turn's content once; "
                             "set loss.revision_template")
    glue = rendered.split(_RESPONSE_SENTINEL, 1)[1]
    return RevisionFormat(PROMPT_FIELD + RESPONSE_FIELD + _escape(glue))


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _response_text(tokenizer, ids: Sequence[int]) -> str:
    """A response's text as a generation reports it: decoded without its final stop token (the EOS,
    or any special token the policy stops on, e.g. an end-of-turn token)."""
    ids = list(ids)
    if ids and (ids[-1] == tokenizer.eos_token_id or ids[-1] in set(tokenizer.all_special_ids)):
        ids = ids[:-1]
    return tokenizer.decode(ids)


def revision_prompt_ids(tokenizer, form: RevisionFormat, prompt_ids: Sequence[int], response_ids: Sequence[int]):
    """Token ids of T(x, y) for a tokenized prompt and response (no special tokens added: a rendered
    prompt carries its own)."""
    text = form.text(tokenizer.decode(list(prompt_ids)), _response_text(tokenizer, response_ids))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def revision_pairs(pairs: Sequence[TokenizedPair], tokenizer, form: RevisionFormat) -> list[TokenizedPair]:
    """The 3N pairs whose log-probs SRPO needs, in three blocks of N aligned with `pairs`:

        [0, N)    (x, y_w, y_l)              the pairs themselves
        [N, 2N)   (T(x, y_l), y_w, y_l)      both responses as revisions of the rejected one
        [2N, 3N)  (T(x, y_w), y_w, y_l)      both responses as revisions of the chosen one
    """
    revised = {"rejected": [], "chosen": []}
    for pair in pairs:
        for side in revised:
            prompt = revision_prompt_ids(tokenizer, form, pair.prompt_ids, getattr(pair, f"{side}_ids"))
            revised[side].append(TokenizedPair(prompt, pair.chosen_ids, pair.rejected_ids,
                                               f"{pair.source} (revising {side})", {}))
    return [*pairs, *revised["rejected"], *revised["chosen"]]


SIX_SEQUENCES = {
    # loss input name: (block of revision_pairs, side)
    "chosen_logps": (0, "chosen"),
    "rejected_logps": (0, "rejected"),
    "chosen_given_rejected_logps": (1, "chosen"),
    "rejected_given_rejected_logps": (1, "rejected"),
    "chosen_given_chosen_logps": (2, "chosen"),
    "rejected_given_chosen_logps": (2, "rejected"),
}


def split_blocks(logps: dict, count: int, role: str) -> dict:
    """{"chosen", "rejected"} (3·count,) log-probs of revision_pairs -> the six `<role>_*_logps` (count,)."""
    return {f"{role}_{name}": logps[side][block * count : (block + 1) * count]
            for name, (block, side) in SIX_SEQUENCES.items()}


# --------------------------------------------------------------------------- self-revision at inference


def round_file(directory: str | Path, number: int) -> Path:
    return Path(directory) / f"round_{number}.jsonl"


def revise(sampler, tokenizer, prompts: Sequence[str], judge_prompts: Sequence[str], rounds: int,
           directory: str | Path, form: RevisionFormat) -> list[list[dict]]:
    """Answer every prompt (round 0), then revise the previous round's answer `rounds` times.

    prompts: rendered prompts (what the policy continues); judge_prompts: what a judge sees. Round k
    is written to `<directory>/round_<k>.jsonl` atomically (one row per prompt: prompt_index, prompt,
    revision_prompt, response, finish_reason), so a killed run resumes at the first missing round and
    a written round is never generated again. The sampler draws round k with seeds keyed by
    (k, prompt index): `sampler.generate(texts, 1, prompt_indices=...)`. Returns every round's rows.
    """
    from nashalign.data.artifacts import read_jsonl, write_jsonl

    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise NashalignError(f"revise: rounds must be an integer >= 0, got {rounds!r}")
    if len(prompts) != len(judge_prompts) or not prompts:
        raise NashalignError("revise: expected the same non-zero number of prompts and judge prompts")
    results: list[list[dict]] = []
    for number in range(rounds + 1):
        path = round_file(directory, number)
        if path.exists():
            rows = read_jsonl(path)
            if [row.get("prompt") for row in rows] != list(judge_prompts):
                raise NashalignError(f"{path}: its rows answer other prompts than these {len(prompts)}; "
                                     "use another output directory")
            results.append(rows)
            continue
        if number == 0:
            texts = list(prompts)
        else:
            texts = [form.text(prompt, row["response"]) for prompt, row in zip(prompts, results[-1])]
        keys = [number * len(prompts) + i for i in range(len(prompts))]
        generations = sampler.generate(texts, 1, prompt_indices=keys, progress=False)
        rows = [{"prompt_index": i, "prompt": judge_prompts[i], "revision_prompt": None if number == 0 else texts[i],
                 "response": group[0].text, "finish_reason": group[0].finish_reason}
                for i, group in enumerate(generations)]
        write_jsonl(path, rows)
        results.append(rows)
    return results


def compare_rounds(oracle, first: list[dict], last: list[dict], *, seed: int = 0):
    """Win rate (evaluate.win_rate, bootstrap interval) of the `last` round's answers over the `first`'s
    under `oracle`, prompt by prompt."""
    from nashalign.eval.metrics import win_rate

    if [row["prompt"] for row in first] != [row["prompt"] for row in last]:
        raise NashalignError("compare_rounds: the two rounds answer different prompts")
    probs = oracle.prob([row["prompt"] for row in last], [row["response"] for row in last],
                        [row["response"] for row in first])
    return win_rate(probs, seed=seed)
