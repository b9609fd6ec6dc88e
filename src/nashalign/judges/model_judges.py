"""Preference oracles backed by local transformers models: a reward model and a pairwise causal-LM judge.

reward_model: a sequence-classification model with one output, r(x, y); P(a ≻ b) = σ(r_a − r_b),
    which is antisymmetric by construction, so each distinct (prompt, response) is scored once
    (memoized across calls: a tournament compares the same responses several times).
pair_model: a causal LM reading a template with the prompt and both responses (the format of
    RLHFlow's pair preference model) and answering with one of two label tokens; the judge's
    q(a, b) = softmax(logit_A, logit_B)[A] at the next position, symmetrized over both orders.

Both score batches under `torch.inference_mode`, sorted by length to limit padding, and keep the last
`max_length` tokens of an over-long input (its end holds the response and the question).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from nashalign import NashalignError, progress
from nashalign.config import ConfigFieldError
from nashalign.judges.oracles import Oracle, check_template, parse_config, symmetrized, template_problem
from nashalign.models.loader import (
    ModelSpec,
    is_local,
    load_causal_lm,
    load_model_config,
    load_sequence_classifier,
    load_tokenizer,
    release,
)

logger = logging.getLogger(__name__)

DEFAULT_PAIR_TEMPLATE = "[CONTEXT] {prompt} [RESPONSE A] {first} [RESPONSE B] {second} \n"
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AT_LEAST_ONE = {"ge": 1}


class ModelJudge(Oracle):
    """An oracle backed by a transformers model that it holds only while judging.

    `model` is a loaded model, or a ModelSpec: then its config is read now (cheap), the weights are
    loaded on the first call, and `release()` drops them again (the online loop releases the judge
    before scoring and training, so it never shares memory with the policy being trained; the next
    judging stage loads it again). A loaded model passed in is kept: it cannot be reloaded.
    """

    def __init__(self, model, *, load, where: str) -> None:
        super().__init__()
        self._spec: ModelSpec | None = model if isinstance(model, ModelSpec) else None
        self._model = None if self._spec is not None else model
        self._load, self._where = load, where
        if self._spec is not None:
            self.model_config = load_model_config(self._spec, where=where)
        else:
            self.model_config = model.config

    @property
    def model(self):
        if self._model is None:
            self._model = self._load(self._spec, where=self._where)
            self._model.config.pad_token_id = self.model_config.pad_token_id
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def release(self) -> None:
        if self._spec is not None and self._model is not None:
            self._model = None
            release()

    def _forward_batches(self, encoded: list[tuple[list[int], bool]], *, left: bool, forward) -> np.ndarray:
        """(n,) float64 `forward(input_ids, attention_mask)` of each `_encode_tail` output, in inference
        mode over padded batches of `batch_size` (left- or right-padded, on the model's device); warns
        once about truncated inputs, reports progress and counts every input as a judge call."""
        import torch

        if any(truncated for _, truncated in encoded):
            count = sum(truncated for _, truncated in encoded)
            logger.warning("%s: %d inputs longer than max_length=%d kept their last tokens", self.name, count, self.max_length)
        sequences = [ids for ids, _ in encoded]
        out = np.empty(len(sequences))
        done = 0
        with torch.inference_mode():
            for rows, ids, mask in _padded_batches(sequences, self.batch_size, self.pad_id, left=left):
                device = self.model.device
                out[rows] = forward(ids.to(device), mask.to(device))
                done += len(rows)
                progress.report(done, len(sequences))
        self.counts.judge_calls += len(sequences)
        return out


def _encode_tail(tokenizer, text: str, max_length: int, add_special_tokens: bool, text_pair: str | None = None):
    """Token ids of `text` (or a text pair), keeping the last `max_length`; (ids, truncated)."""
    ids = tokenizer(text, text_pair, add_special_tokens=add_special_tokens)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


def _padded_batches(sequences: list[list[int]], batch_size: int, pad_id: int, left: bool):
    """Yield (row indices, input_ids (b, T), attention_mask (b, T)) over length-sorted chunks."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(sequences[rows[0]])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(sequences[i])
            span = slice(width - n, width) if left else slice(0, n)
            ids[r, span] = torch.tensor(sequences[i], dtype=torch.long)
            mask[r, span] = 1
        yield rows, ids, mask


def _pad_id(model_config, tokenizer) -> int:
    for candidate in (model_config.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """path: model directory (or hub name when online); batch_size rows per forward pass;
    max_length tokens kept per input; device "auto" | "cpu" | "cuda[:n]"; dtype auto | float32 | ..."""

    path: str
    batch_size: int = dataclasses.field(default=8, metadata=AT_LEAST_ONE)
    max_length: int = dataclasses.field(default=2048, metadata=AT_LEAST_ONE)
    device: str = "auto"
    dtype: Dtype = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


class RewardModelOracle(ModelJudge):
    """P(a ≻ b) = σ(r(x, a) − r(x, b)), r the single logit of a sequence-classification model.

    Inputs are the tokenizer's chat template over [user: prompt, assistant: response] when it has
    one, else the (prompt, response) text pair. The model reads the reward at the last non-pad
    token, so `model.config.pad_token_id` is set to the padding id when missing.
    """

    name = "reward_model"
    slow = True

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int = 2048, memo_size: int = 100_000,
                 where: str = "reward_model"):
        super().__init__(model, load=load_sequence_classifier, where=where)
        num_labels = getattr(self.model_config, "num_labels", None)
        if num_labels != 1:
            raise NashalignError(f"reward_model: the model has num_labels={num_labels}; expected 1 (a scalar reward)")
        self.tokenizer = tokenizer
        self.batch_size, self.max_length, self.memo_size = batch_size, max_length, memo_size
        self.pad_id = _pad_id(self.model_config, tokenizer)
        if self.model_config.pad_token_id is None:
            self.model_config.pad_token_id = self.pad_id
        self._memo: OrderedDict[bytes, float] = OrderedDict()

    def _encode(self, prompt: str, response: str):
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            return _encode_tail(self.tokenizer, text, self.max_length, add_special_tokens=False)
        return _encode_tail(self.tokenizer, prompt, self.max_length, add_special_tokens=True, text_pair=response)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(B,) float64 rewards r(prompts[i], responses[i])."""
        keys = [hashlib.sha1(f"{p}\0{r}".encode()).digest() for p, r in zip(prompts, responses)]
        todo = {key: (p, r) for key, p, r in zip(keys, prompts, responses) if key not in self._memo}
        if todo:
            rewards = self._forward_batches([self._encode(p, r) for p, r in todo.values()], left=False,
                                            forward=self._rewards)
            for key, reward in zip(todo, rewards):
                self._memo[key] = float(reward)
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return np.array([self._memo[key] for key in keys], dtype=np.float64)

    def _rewards(self, input_ids, attention_mask) -> np.ndarray:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, 0].double().cpu().numpy()

    def _prob(self, prompts, first, second):
        rewards = self.score(prompts + prompts, first + second)
        size = len(first)
        return 1.0 / (1.0 + np.exp(rewards[size:] - rewards[:size]))


@dataclasses.dataclass(frozen=True)
class PairModelConfig:
    """template: str.format with {prompt}, {first}, {second}; labels: the two single-token answers
    meaning "first is better" and "second is better"; chat_template: wrap the filled template as a
    user turn with the tokenizer's chat template (when it has one) and add the generation prompt."""

    path: str
    template: str = DEFAULT_PAIR_TEMPLATE
    labels: list[str] = dataclasses.field(default_factory=lambda: ["A", "B"])
    chat_template: bool = True
    batch_size: int = dataclasses.field(default=8, metadata=AT_LEAST_ONE)
    max_length: int = dataclasses.field(default=2048, metadata=AT_LEAST_ONE)
    device: str = "auto"
    dtype: Dtype = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    both_orders: bool = True

    def check(self) -> None:
        problem = template_problem(self.template, {"prompt", "first", "second"})
        if problem:
            raise ConfigFieldError("template", problem)
        if len(self.labels) != 2 or self.labels[0] == self.labels[1]:
            raise ConfigFieldError("labels", f"expected two different labels, got {self.labels}")


class PairModelOracle(ModelJudge):
    """A causal-LM pairwise judge; q(a, b) = exp(ℓ_A) / (exp(ℓ_A) + exp(ℓ_B)) at the next token.

    Batches are left-padded with explicit position ids, so a row's answer does not depend on the
    other rows of its batch, and only the last position's logits are computed.
    """

    name = "pair_model"
    slow = True

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = DEFAULT_PAIR_TEMPLATE,
        labels: Sequence[str] = ("A", "B"),
        chat_template: bool = True,
        batch_size: int = 8,
        max_length: int = 2048,
        both_orders: bool = True,
        where: str = "pair_model",
    ):
        super().__init__(model, load=load_causal_lm, where=where)
        self.template = check_template(template, {"prompt", "first", "second"}, "pair_model: template")
        if len(labels) != 2 or labels[0] == labels[1]:
            raise NashalignError(f"pair_model: labels: expected two different labels, got {list(labels)}")
        self.label_ids = []
        for label in labels:
            ids = tokenizer.encode(label, add_special_tokens=False)
            if len(ids) != 1:
                raise NashalignError(
                    f"pair_model: labels: {label!r} is {len(ids)} tokens for this tokenizer; each label must be one token"
                )
            self.label_ids.append(ids[0])
        self.tokenizer = tokenizer
        self.use_chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.batch_size, self.max_length, self.both_orders = batch_size, max_length, both_orders
        self.pad_id = _pad_id(self.model_config, tokenizer)

    def _encode(self, prompt: str, first: str, second: str):
        text = self.template.format(prompt=prompt, first=first, second=second)
        if self.use_chat_template:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return _encode_tail(self.tokenizer, text, self.max_length, add_special_tokens=False)
        return _encode_tail(self.tokenizer, text, self.max_length, add_special_tokens=True)

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """(B,) the judge's own, position-biased q(first, second) (not symmetrized)."""
        encoded = [self._encode(p, a, b) for p, a, b in zip(prompts, first, second)]
        return self._forward_batches(encoded, left=True, forward=self._first_label_probs)

    def _first_label_probs(self, input_ids, attention_mask) -> np.ndarray:
        """(b,) P(first label) over the two labels at the next token of each left-padded row."""
        import torch

        from nashalign.data.token_logps import position_ids_from_mask

        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=1,
        ).logits[:, -1, self.label_ids]
        return torch.softmax(logits.double(), dim=-1)[:, 0].cpu().numpy()

    def _prob(self, prompts, first, second):
        return symmetrized(self.judge, prompts, first, second, self.both_orders)


def _judge_spec(config, where: str) -> ModelSpec:
    """How the judge's model loads; a path-like name that is no directory is refused now."""
    spec = ModelSpec(str(Path(config.path).expanduser()) if config.path.startswith("~") else config.path,
                     revision=config.revision, dtype=config.dtype, device=config.device,
                     trust_remote_code=config.trust_remote_code)
    if config.path.startswith((".", "/", "~")) and not is_local(spec.name_or_path):
        raise NashalignError(f"{where}: path: no model directory {config.path!r}")
    return spec


def build_reward_model(spec, where: str = "oracle") -> RewardModelOracle:
    """A reward-model judge from its config mapping; its weights load when it first judges."""
    config = parse_config(RewardModelConfig, spec, where)
    model = _judge_spec(config, where)
    tokenizer = load_tokenizer(model, where=f"{where}: path", pad_fallback=False)
    return RewardModelOracle(model, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
                             where=f"{where}: path")


def build_pair_model(spec, where: str = "oracle") -> PairModelOracle:
    """A pairwise causal-LM judge from its config mapping; its weights load when it first judges."""
    config = parse_config(PairModelConfig, spec, where)
    model = _judge_spec(config, where)
    tokenizer = load_tokenizer(model, where=f"{where}: path", pad_fallback=False)
    return PairModelOracle(
        model,
        tokenizer,
        template=config.template,
        labels=config.labels,
        chat_template=config.chat_template,
        batch_size=config.batch_size,
        max_length=config.max_length,
        both_orders=config.both_orders,
        where=f"{where}: path",
    )
