"""`nashalign eval winrate|ranking|generate`: evaluate a policy (the statistics live in nashalign.eval.metrics).

    nashalign eval winrate --policy DIR --baseline DIR|responses.jsonl --prompts FILE --oracle ORACLE.yaml
        Samples one response per prompt from the policy (and from the baseline when it is a model),
        asks the oracle P(policy ≻ baseline), and reports the win rate with a 95% bootstrap interval,
        the length-controlled win rate, response lengths, and KL(π‖π_ref) from the policy's samples
        (π_ref = --ref, or the baseline model).
    nashalign eval ranking --model DIR --data pairs.jsonl [--ref DIR] [--beta B]
        Ranking accuracy of the model on preference pairs (summed, length-normalized, and the implicit
        reward against --ref), and the idealized ranking accuracy of the DPO optimum when the records
        carry a preference probability (field --pref-field).
    nashalign eval generate --model DIR --prompts FILE --output-dir DIR [--name NAME]
        The model's answer to every prompt of an AlpacaEval, Arena-Hard or nashalign prompt file (a local
        file), written as answers.jsonl, alpaca_eval.json (AlpacaEval's model outputs) and
        arena_hard.jsonl (Arena-Hard's model answers); see nashalign.eval.answers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _model_options() -> argparse.ArgumentParser:
    """How every model of the command loads (the same settings for policy, baseline and reference)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model loading (every model of the command)")
    group.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--revision", help="hub branch, tag or commit of hub-named models")
    group.add_argument("--trust-remote-code", action="store_true", help="run modelling code shipped with a hub model")
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="task", required=True)
    models = _model_options()
    win = sub.add_parser("winrate", help="win rate of a policy against a baseline under an oracle", parents=[models])
    win.add_argument("--policy", required=True, help="model directory (or hub name) of the policy")
    win.add_argument("--baseline", required=True, help="a model, or a JSONL file with a 'response' per prompt")
    win.add_argument("--prompts", required=True, help="prompts file (field 'prompt': a string or messages)")
    win.add_argument("--oracle", required=True, help="YAML file with the oracle mapping (a 'type' key)")
    win.add_argument("--ref", help="reference model for KL(π‖π_ref); default: the baseline model")
    win.add_argument("--max-new-tokens", type=int, default=256)
    win.add_argument("--temperature", type=float, default=1.0)
    win.add_argument("--batch-size", type=int, default=16)
    win.add_argument("--seed", type=int, default=0)
    win.add_argument("--output", help="also write the results as JSON to this file")
    rank = sub.add_parser("ranking", help="ranking accuracy of a model on preference pairs", parents=[models])
    rank.add_argument("--model", required=True)
    rank.add_argument("--data", required=True, help="preference pairs (.jsonl/.json/.parquet/datasets dir)")
    rank.add_argument("--ref", help="reference model: implicit-reward accuracy and the idealized accuracy")
    rank.add_argument("--beta", type=float, default=0.1, help="β of the DPO optimum (idealized accuracy)")
    rank.add_argument("--pref-field", default="pref_prob", help="record field with P(chosen ≻ rejected)")
    rank.add_argument("--max-length", type=int, default=1024)
    rank.add_argument("--batch-size", type=int, default=8)
    rank.add_argument("--output", help="also write the results as JSON to this file")
    gen = sub.add_parser("generate", help="a model's answers in AlpacaEval / Arena-Hard / JSONL files",
                         parents=[models])
    gen.add_argument("--model", required=True, help="model directory (or hub name)")
    gen.add_argument("--prompts", required=True,
                     help="local prompt file: AlpacaEval ('instruction'), Arena-Hard ('uid', 'prompt') or 'prompt' rows")
    gen.add_argument("--output-dir", required=True, help="where answers.jsonl, alpaca_eval.json, arena_hard.jsonl go")
    gen.add_argument("--name", help="the generator / model name in the files; default: the model's directory name")
    gen.add_argument("--max-new-tokens", type=int, default=2048)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--limit", type=int, help="answer only the first this many prompts")


def _spec(name: str, args):
    from nashalign.models.loader import ModelSpec

    return ModelSpec(name, revision=args.revision, dtype=args.dtype, device=args.device,
                     trust_remote_code=args.trust_remote_code)


def _load(name: str, args, where: str):
    """(model, tokenizer) through the one loader; a tokenizer without a pad token pads with EOS."""
    from nashalign.models.loader import load_causal_lm, load_tokenizer

    spec = _spec(name, args)
    return load_causal_lm(spec, where=where), load_tokenizer(spec, where=where)


def _response_logps(model, tokenizer, prompt_ids, response_ids, batch_size: int):
    """Summed log π(response | prompt) of each (prompt, response), each scored once."""
    import torch

    from nashalign.data.logprobs import sequence_logps

    with torch.inference_mode():
        values = sequence_logps(model, list(zip(prompt_ids, response_ids)), tokenizer.pad_token_id,
                                batch_size=batch_size)
    return values.double().cpu().numpy()


def _pair_logps(model, tokenizer, pairs, batch_size: int):
    """(chosen, rejected) summed log-probs of preference pairs: one forward pass per pair batch,
    every response scored once (the prompt once for both with packing)."""
    from nashalign.data.cache import score_pairs
    from nashalign.data.tokenization import collate_pairs

    scored = score_pairs(model, pairs, batch_size=batch_size, cache=None,
                         collate_fn=lambda batch: collate_pairs(batch, tokenizer.pad_token_id))
    return scored["chosen_logps"].double().numpy(), scored["rejected_logps"].double().numpy()


def _sample(model, tokenizer, rendered, args):
    from nashalign.sampling.engines import TransformersSampler

    sampler = TransformersSampler(model, tokenizer, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, batch_size=args.batch_size, seed=args.seed)
    return [group[0] for group in sampler.generate(rendered, 1)]


def _baseline_file(path: Path, count: int) -> list[str]:
    from nashalign import NashalignError
    from nashalign.data.artifacts import read_jsonl

    rows = read_jsonl(path)
    if len(rows) != count:
        raise NashalignError(f"{path}: {len(rows)} responses, expected one per prompt ({count})")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("response"), str):
            raise NashalignError(f"{path}:{number}: field 'response': expected a string")
    return [row["response"] for row in rows]


def _win_rate(args) -> dict:
    import numpy as np
    import yaml

    from nashalign import NashalignError
    from nashalign.data.json_input import RECURSION
    from nashalign.eval.metrics import kl_from_samples, length_controlled_win_rate, length_stats, win_rate
    from nashalign.judges.registry import build_oracle
    from nashalign.online.loop import PromptsConfig, judge_text, load_prompts, render_prompt

    try:
        spec = yaml.safe_load(Path(args.oracle).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise NashalignError(f"{args.oracle}: cannot read the oracle config ({error})") from None
    except RecursionError:  # the YAML composer recurses once per nesting level
        raise NashalignError(f"{args.oracle}: cannot read the oracle config: {RECURSION}") from None
    oracle = build_oracle(spec.get("oracle", spec) if isinstance(spec, dict) else spec, where=args.oracle)
    prompts = load_prompts(PromptsConfig(file=args.prompts))
    policy, tokenizer = _load(args.policy, args, "--policy")
    rendered = [render_prompt(p, tokenizer) for p in prompts]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    samples = _sample(policy, tokenizer, rendered, args)
    policy_texts = [g.text for g in samples]
    policy_ids = [g.response_ids for g in samples]
    baseline_path = Path(args.baseline)
    if baseline_path.is_file():
        baseline_texts = _baseline_file(baseline_path, len(prompts))
        baseline_model = None
    else:
        baseline_model, baseline_tokenizer = _load(args.baseline, args, "--baseline")
        baseline_texts = [g.text for g in _sample(baseline_model, baseline_tokenizer, rendered, args)]
    judge_prompts = [judge_text(p) for p in prompts]
    probs = oracle.prob(judge_prompts, policy_texts, baseline_texts)
    policy_lengths = np.array([len(ids) for ids in policy_ids], dtype=float)
    baseline_lengths = np.array([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in baseline_texts], dtype=float)
    rate = win_rate(probs, seed=args.seed)
    lc = length_controlled_win_rate(probs, policy_lengths, baseline_lengths, seed=args.seed)
    result = {
        "prompts": len(prompts),
        "win_rate": {"estimate": rate.estimate, "low": rate.low, "high": rate.high, "confidence": rate.confidence},
        "length_controlled_win_rate": {"estimate": lc.estimate, "low": lc.low, "high": lc.high},
        "policy_length": vars(length_stats(policy_lengths)),
        "baseline_length": vars(length_stats(baseline_lengths)),
        "judge_calls": oracle.counts.judge_calls,
    }
    ref_model = _load(args.ref, args, "--ref")[0] if args.ref else baseline_model
    if ref_model is not None:
        own = _response_logps(policy, tokenizer, prompt_ids, policy_ids, args.batch_size)
        ref = _response_logps(ref_model, tokenizer, prompt_ids, policy_ids, args.batch_size)
        kl = kl_from_samples(own, ref)
        result["kl_to_ref"] = {"estimate": kl.estimate, "stderr": kl.stderr, "estimator": kl.estimator}
    return result


def _ranking(args) -> dict:
    import numpy as np

    from nashalign.data.tokenization import load_records, tokenize_records
    from nashalign.eval.metrics import idealized_ranking_accuracy, ranking_accuracy
    from nashalign.sampling.engines import stop_token_ids

    model, tokenizer = _load(args.model, args, "--model")
    records = load_records(args.data)
    pairs, _ = tokenize_records(records, tokenizer, max_length=args.max_length,
                                stop_token_ids=stop_token_ids(_spec(args.model, args), tokenizer))
    lengths = (np.array([len(p.chosen_ids) for p in pairs]), np.array([len(p.rejected_ids) for p in pairs]))
    own = _pair_logps(model, tokenizer, pairs, args.batch_size)
    ref = (None, None)
    if args.ref:
        del model
        ref_model = _load(args.ref, args, "--ref")[0]
        ref = _pair_logps(ref_model, tokenizer, pairs, args.batch_size)
    accuracy = ranking_accuracy(own[0], own[1], ref[0], ref[1], *lengths)
    result = {"pairs": accuracy.n, "summed": accuracy.summed, "length_normalized": accuracy.length_normalized,
              "implicit_reward": accuracy.reward}
    probs = [p.extra.get(args.pref_field) for p in pairs]
    if args.ref and all(isinstance(v, (int, float)) for v in probs):
        result["idealized"] = idealized_ranking_accuracy(ref[0], ref[1], np.array(probs, float), beta=args.beta)
    else:
        result["idealized"] = None
        result["idealized_note"] = f"needs --ref and a numeric '{args.pref_field}' on every record"
    return result


def _generate(args) -> dict:
    from nashalign.data.artifacts import atomic_write_text, write_jsonl
    from nashalign.eval.answers import answer_rows, chat_form, read_prompt_set
    from nashalign.online.prompts import render_prompt

    if args.limit is not None and args.limit < 1:
        from nashalign import NashalignError

        raise NashalignError(f"--limit: expected a positive integer, got {args.limit}")
    prompts = read_prompt_set(args.prompts, args.limit)
    model, tokenizer = _load(args.model, args, "--model")
    rendered = [render_prompt(chat_form(p.prompt, tokenizer), tokenizer) for p in prompts]
    outputs = _sample(model, tokenizer, rendered, args)
    name = args.name or Path(args.model.rstrip("/")).name
    files = answer_rows(prompts, outputs, name)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "answers.jsonl", files["answers.jsonl"])
    atomic_write_text(out / "alpaca_eval.json", json.dumps(files["alpaca_eval.json"], indent=2, ensure_ascii=False) + "\n")
    write_jsonl(out / "arena_hard.jsonl", files["arena_hard.jsonl"])
    return {"prompts": len(prompts), "generator": name, "files": [str(out / key) for key in files],
            "stopped": sum(o.finish_reason == "stop" for o in outputs)}


def run(args: argparse.Namespace) -> int:
    tasks = {"winrate": _win_rate, "ranking": _ranking, "generate": _generate}
    result = tasks[args.task](args)
    text = json.dumps(result, indent=2)
    print(text)
    if getattr(args, "output", None):
        from nashalign.data.artifacts import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    return 0
