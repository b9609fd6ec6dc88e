"""`nashalign revise`: answer each prompt, then revise the answer N times with the same model (SRPO).

    nashalign revise --model DIR --prompts FILE --rounds N --output DIR [--oracle ORACLE.yaml]

Writes <output>/round_0.jsonl … round_N.jsonl (one row per prompt: prompt_index, prompt,
revision_prompt, response, finish_reason), each atomically as soon as its round is generated; a run
that stops resumes at the first missing round. With --oracle, the last round is compared with round
0 under the oracle and <output>/winrate.json holds the win rate of round N over round 0 with its 95%
bootstrap interval (also printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or hub name), trained with loss srpo")
    parser.add_argument("--prompts", required=True, help="prompts file (a string or messages per record)")
    parser.add_argument("--field", default="prompt", help="the record field holding the prompt")
    parser.add_argument("--rounds", type=int, default=1, help="revisions after the first answer (N)")
    parser.add_argument("--output", required=True, help="directory of round_<k>.jsonl (and winrate.json)")
    parser.add_argument("--instruction", default="Improve this answer.",
                        help="the revision request: loss.revision_instruction of the training run")
    parser.add_argument("--template", help="loss.revision_template of the training run, if it set one")
    parser.add_argument("--oracle", help="YAML file with an oracle mapping: compare round N with round 0")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def _load(path: str):
    """(model, tokenizer) through the one model loader (a directory or a hub id)."""
    from nashalign.models.loader import load_causal_lm, load_tokenizer

    return load_causal_lm(path, where="--model"), load_tokenizer(path, where="--model", pad_fallback=False)


def _oracle(path: str):
    import yaml

    from nashalign import NashalignError
    from nashalign.judges.registry import build_oracle

    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise NashalignError(f"{path}: cannot read the oracle config ({error})") from None
    return build_oracle(spec.get("oracle", spec) if isinstance(spec, dict) else spec, where=path)


def run(args: argparse.Namespace) -> int:
    from nashalign.data.artifacts import write_json
    from nashalign.online.prompts import PromptsConfig, judge_text, load_prompts, render_prompt
    from nashalign.sampling.engines import TransformersSampler
    from nashalign.train.srpo import compare_rounds, revise, revision_format

    oracle = _oracle(args.oracle) if args.oracle else None  # a bad oracle file fails before any sampling
    prompts = load_prompts(PromptsConfig(file=args.prompts, field=args.field))
    model, tokenizer = _load(args.model)
    sampler = TransformersSampler(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    form = revision_format(tokenizer, args.instruction, args.template)
    rounds = revise(sampler, tokenizer, [render_prompt(p, tokenizer) for p in prompts],
                    [judge_text(p) for p in prompts], args.rounds, args.output, form)
    print(f"{len(prompts)} prompts, rounds 0..{args.rounds}: {Path(args.output)}/round_<k>.jsonl")
    if oracle is not None:
        rate = compare_rounds(oracle, rounds[0], rounds[-1], seed=args.seed)
        result = {"rounds": [0, args.rounds], "prompts": len(prompts), "win_rate": vars(rate),
                  "judge_calls": oracle.counts.judge_calls}
        write_json(Path(args.output) / "winrate.json", result)
        print(json.dumps(result, indent=2))
    return 0
