"""The embedded demo: a tiny language model aligned to an intransitive preference, nothing downloaded.

The task: prompts from several families ("Name a fruit.", "Pick a colour.", ...), each family with five
allowed answers. The preference over a family's answers is the majority vote of three Bradley–Terry
annotators (`games.CONDORCET_SCORES`, permuted per family): every annotator is transitive, the majority
is not (a Condorcet cycle), so no scalar reward explains it and the target is the Nash policy of the
KL-regularized game.

1. A tiny Llama-style model is supervised-trained in-process to answer each prompt with one of its
   family's answers, with a skewed distribution (mostly the answers the majority dislikes). This is
   π_ref = π_0.
2. The chosen algorithms (`DemoSettings.algorithms`, `--algorithms`: any online algorithm, and
   `inpo-refresh`, INPO whose reference becomes the current policy every `refresh_every` iterations)
   each run the online loop (nashalign.online.loop) from π_0 against the same oracle.
3. After every iteration, the exact duality gap of each language model's policy (KL-regularized,
   against π_0 and τ) and its unregularized gap DG₀ = 2·max_y P(y ≻ π) − 1 (0 only at the Nash
   policy of the preference itself) are computed by scoring every allowed answer (renormalized over
   the allowed set), with head-to-head win rates; a report (Markdown + HTML + PNG plots) is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nashalign.core.games import CONDORCET_SCORES, majority_vote
from nashalign.judges.oracles import GameOracle, Oracle

logger = logging.getLogger(__name__)

FAMILIES = {
    "fruit": ("apple", "banana", "cherry", "grape", "mango"),
    "colour": ("red", "blue", "green", "yellow", "purple"),
    "animal": ("cat", "dog", "horse", "tiger", "zebra"),
    "city": ("paris", "tokyo", "cairo", "lima", "oslo"),
}
TEMPLATES = ("Name a {f}.", "Pick one {f}.", "Which {f} do you like?", "Tell me a {f}.",
             "Your favourite {f}?", "Say a {f}, please.")
# π_ref over a family's answers before permutation: mass on the answers the majority dislikes (D, E).
SFT_DISTRIBUTION = np.array([0.15, 0.1, 0.05, 0.4, 0.3])


@dataclasses.dataclass
class DemoSettings:
    """Everything the demo does, with defaults that finish in minutes on 2 CPU cores."""

    output_dir: str = "runs/demo"
    iterations: int = 6
    algorithms: tuple[str, ...] = ("inpo", "iterative-dpo")
    refresh_every: int = 2
    seed: int = 0
    tau: float = 0.1
    eta: float = 0.3
    dpo_beta: float = 0.1
    samples_per_prompt: int = 16
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 32
    sft_steps: int = 250
    sft_lr: float = 3e-3
    hidden_size: int = 64
    num_layers: int = 2
    families: int = len(FAMILIES)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    answers: tuple[str, ...]
    P: np.ndarray
    sft_distribution: np.ndarray


def build_families(count: int = len(FAMILIES), seed: int = 0) -> list[Family]:
    """The demo's families; family i relabels the Condorcet game's answers by a seeded permutation."""
    rng = np.random.default_rng(seed)
    base = majority_vote(CONDORCET_SCORES)
    families = []
    for name, answers in list(FAMILIES.items())[:count]:
        perm = rng.permutation(len(answers))  # answers[perm[i]] plays the role of game response i
        order = np.argsort(perm)
        families.append(Family(name, answers, base[np.ix_(order, order)], SFT_DISTRIBUTION[order]))
    return families


def family_prompts(families: Sequence[Family]) -> list[tuple[Family, str]]:
    return [(family, template.format(f=family.name)) for family in families for template in TEMPLATES]


class FamilyGameOracle(Oracle):
    """The demo's oracle: the family of the prompt picks the game; answers outside it lose."""

    name = "demo-game"

    def __init__(self, prompts: Sequence[tuple[Family, str]]):
        super().__init__()
        self._games = {
            family.name: GameOracle(family.answers, family.P, invalid="worst") for family, _ in prompts
        }
        self._family_of = {text: family.name for family, text in prompts}

    def _prob(self, prompts, first, second):
        out = np.empty(len(prompts))
        for name, game in self._games.items():
            rows = [i for i, p in enumerate(prompts) if self._family_of[p] == name]
            if rows:
                out[rows] = game.prob([prompts[i] for i in rows], [first[i] for i in rows], [second[i] for i in rows])
        self.counts.judge_calls += len(prompts)
        return out


# --------------------------------------------------------------------------- step 1: π_ref by SFT


def supervised_start(directory: Path, prompts, settings: DemoSettings) -> Path:
    """Train the tiny model to answer like `Family.sft_distribution`; save it (HF format) atomically.

    Hand-written loop (a few lines) because SFT is not the product: the expected NLL of the target
    distribution is minimized exactly over answers, no sampling noise.
    """
    import torch

    from nashalign.data.logprobs import sequence_logps
    from nashalign.models.tiny import build_model, build_tokenizer
    from nashalign.train.checkpoint import atomic_directory

    if (directory / "config.json").exists():
        return directory
    corpus = [" ".join(f.answers) + " " + text for f, text in prompts] * 20
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                        num_heads=4, seed=settings.seed).train()
    rows, weights = [], []
    for family, text in prompts:
        prompt_ids = _prompt_ids(tokenizer, text)
        for answer, w in zip(family.answers, family.sft_distribution):
            rows.append((prompt_ids, tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]))
            weights.append(w / len(prompts))
    weights_t = torch.tensor(weights, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.sft_lr, weight_decay=0.0)
    from tqdm.auto import tqdm

    for _ in tqdm(range(settings.sft_steps), desc="sft", unit="step"):
        loss = -(weights_t * sequence_logps(model, rows, tokenizer.pad_token_id)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with atomic_directory(directory, marker=None) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return directory


def _prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- step 3: exact evaluation


def answer_distributions(model_dir: Path, prompts) -> tuple[list[np.ndarray], list[float]]:
    """Each prompt's distribution over its family's answers (renormalized), and the mass on them."""
    import torch

    from nashalign.data.logprobs import sequence_logps
    from nashalign.eval.metrics import lm_response_distribution
    from nashalign.models.loader import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)

    def score(text: str, answers: Sequence[str]):
        prompt_ids = _prompt_ids(tokenizer, text)
        rows = [(prompt_ids, tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                for a in answers]
        with torch.inference_mode():
            return sequence_logps(model, rows, tokenizer.pad_token_id).double().numpy()

    policies, masses = [], []
    for family, text in prompts:
        policy, mass = lm_response_distribution(score, text, family.answers)
        policies.append(policy)
        masses.append(mass)
    return policies, masses


def evaluate_policy(policies, masses, ref_policies, prompts, tau: float) -> dict[str, float]:
    """Mean over prompts of the exact duality gap (regularized: against π_ref and τ), the unregularized
    gap DG₀, KL to π_ref (over the allowed answers), and the mass on the allowed answers."""
    from nashalign.core.games import duality_gap, kl_divergence, unregularized_gap

    gaps = [float(duality_gap(f.P, ref, pol, tau)) for (f, _), pol, ref in zip(prompts, policies, ref_policies)]
    unregularized = [float(unregularized_gap(f.P, pol)) for (f, _), pol in zip(prompts, policies)]
    kls = [float(kl_divergence(pol, ref)) for pol, ref in zip(policies, ref_policies)]
    return {"duality_gap": float(np.mean(gaps)), "unregularized_gap": float(np.mean(unregularized)),
            "kl": float(np.mean(kls)), "allowed_mass": float(np.mean(masses))}


def exact_win_rate(first, second, prompts, first_mass=None, second_mass=None) -> float:
    """Mean over prompts of P(y ≻ y'), y ~ first, y' ~ second, over the allowed answers. With masses
    given, the remaining probability is an invalid answer, which loses to every valid one (ties ½)."""
    rates = []
    for i, ((family, _), a, b) in enumerate(zip(prompts, first, second)):
        ma = 1.0 if first_mass is None else first_mass[i]
        mb = 1.0 if second_mass is None else second_mass[i]
        valid = ma * mb * float(a @ family.P @ b)
        rates.append(valid + ma * (1 - mb) + 0.5 * (1 - ma) * (1 - mb))
    return float(np.mean(rates))


# --------------------------------------------------------------------------- the demo


DEMO_VARIANTS = {"inpo-refresh": "inpo"}
"""Demo names beyond the online algorithms: inpo-refresh is INPO with run.ref_update_every = refresh_every."""


def demo_algorithms() -> tuple[str, ...]:
    """The names `--algorithms` accepts: every online algorithm and the demo's variants."""
    from nashalign.online.config import ALGORITHMS

    return (*ALGORITHMS, *DEMO_VARIANTS)


def online_config(settings: DemoSettings, algorithm: str, start: Path, prompts_file: Path, run_dir: Path):
    from nashalign.config import from_mapping
    from nashalign.online.loop import OnlineConfig

    base = DEMO_VARIANTS.get(algorithm, algorithm)
    # INPO's loss is minimized by the OMD step when pairs are drawn from π_t × π_t and labelled by P:
    # all pairs of the K samples, labels drawn from P, is exactly that draw (also for its variants).
    inpo = base in ("inpo", "inpo-optimistic")
    run = {"name": algorithm, "dir": str(run_dir), "algorithm": base, "iterations": settings.iterations,
           "seed": settings.seed}
    if algorithm == "inpo-refresh":
        run["ref_update_every"] = settings.refresh_every
    if inpo:
        loss = {"eta": settings.eta, "tau": settings.tau, "beta": settings.dpo_beta}
    elif base in ("online-ipo", "nash-md"):
        loss = {"tau": settings.tau, "beta": settings.dpo_beta}
    else:
        loss = {"beta": settings.dpo_beta}
    pairs = {} if base == "nash-md" else {"method": "all_pairs" if inpo or base == "online-ipo" else "best_vs_worst"}
    return from_mapping(OnlineConfig, {
        "model": {"name_or_path": str(start)},
        "run": run,
        "prompts": {"file": str(prompts_file)},
        "sampling": {"backend": "transformers", "samples_per_prompt": settings.samples_per_prompt,
                     "max_new_tokens": 8, "temperature": 1.0, "batch_size": 64},
        "pairs": pairs,
        "data": {"max_length": 64, "max_prompt_length": 48, "scoring_batch_size": 64},
        "loss": loss,
        "optim": {"lr": settings.lr, "epochs": settings.epochs, "per_device_batch_size": settings.batch_size,
                  "schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 10.0},
        "output": {"save_steps": 0, "report_to": "none"},
    }, source="<demo>")


def run_demo(settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole demo; return per-algorithm rows of metrics per iteration and the report paths."""
    from nashalign.data.artifacts import read_jsonl, write_json, write_jsonl
    from nashalign.eval.report import write_report
    from nashalign.online.loop import run_online

    settings = settings or DemoSettings()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    families = build_families(settings.families, settings.seed)
    prompts = family_prompts(families)
    prompts_file = out / "prompts.jsonl"
    write_jsonl(prompts_file, ({"prompt": [{"role": "user", "content": text}]} for _, text in prompts))
    start = supervised_start(out / "sft", prompts, settings)
    oracle = FamilyGameOracle(prompts)
    ref_policies, ref_mass = answer_distributions(start, prompts)
    ref_metrics = evaluate_policy(ref_policies, ref_mass, ref_policies, prompts, settings.tau)

    series: dict[str, list[dict[str, Any]]] = {}
    finals: dict[str, list[tuple[list[np.ndarray], list[float]]]] = {}
    loss_curves: dict[str, list[tuple[int, float]]] = {}
    samples: list[dict[str, Any]] = []
    for algorithm in settings.algorithms:
        result = run_online(online_config(settings, algorithm, start, prompts_file, out), oracle=oracle)
        rows = [{"iteration": 0, **ref_metrics, "win_rate_vs_ref": 0.5}]
        dists = [(ref_policies, ref_mass)]
        offset = 0
        for t, summary in enumerate(result.summaries):
            it = result.run_dir / f"iter_{t}"
            policies, masses = answer_distributions(it / "train" / "final", prompts)
            dists.append((policies, masses))
            rows.append({
                "iteration": t + 1,
                **evaluate_policy(policies, masses, ref_policies, prompts, settings.tau),
                "win_rate_vs_ref": exact_win_rate(policies, ref_policies, prompts, masses, ref_mass),
                "mean_length": summary["mean_response_length"],
                "loss": summary["loss"],
            })
            metrics = read_jsonl(it / "train" / "metrics.jsonl")
            loss_curves.setdefault(algorithm, []).extend((offset + m["step"], m["loss"]) for m in metrics)
            offset += len(metrics)
        for g in read_jsonl(result.run_dir / f"iter_{settings.iterations}" / "generations.jsonl")[:: settings.samples_per_prompt * 3]:
            samples.append({"algorithm": algorithm, "iteration": settings.iterations,
                            "prompt": prompts[g["prompt_index"]][1], "response": g["text"]})
        series[algorithm] = rows
        finals[algorithm] = dists

    head_to_head = {}
    names = list(settings.algorithms)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            head_to_head[f"{a} vs {b}"] = [
                exact_win_rate(pa, pb, prompts, ma, mb) for (pa, ma), (pb, mb) in zip(finals[a], finals[b])
            ]
    for name, values in head_to_head.items():
        for row, value in zip(series[names[0]], values):
            row[f"win_rate {name}"] = value
    ref_gap = ref_metrics["duality_gap"]
    notes = [
        f"{len(prompts)} prompts in {len(families)} families, 5 allowed answers each; oracle: majority vote of "
        "3 Bradley–Terry annotators (a Condorcet cycle in every family)",
        f"τ = {settings.tau}, η = {settings.eta} (INPO), β = {settings.dpo_beta} (iterative DPO); "
        f"K = {settings.samples_per_prompt} samples per prompt; {settings.iterations} iterations"
        + (f"; inpo-refresh: π_ref ← π_t every {settings.refresh_every} iterations" if "inpo-refresh" in names
           else ""),
        f"reference policy's exact duality gap: {ref_gap:.4f}, unregularized DG₀: {ref_metrics['unregularized_gap']:.4f}",
    ] + [f"{a}: final gap {series[a][-1]['duality_gap']:.4f} ({series[a][-1]['duality_gap'] / ref_gap:.2f} × the "
         f"reference's), DG₀ {series[a][-1]['unregularized_gap']:.4f}" for a in names]
    paths = write_report(out / "report", title="nashalign demo: INPO on an intransitive preference",
                         series=series, loss_curves=loss_curves, samples=samples, notes=notes)
    summary = {"series": series, "head_to_head": head_to_head, "reference_gap": ref_gap,
               "report": str(paths.html), "notes": notes}
    write_json(out / "demo_summary.json", summary)
    return summary


def format_demo_table(summary: dict[str, Any]) -> str:
    """Per iteration: each algorithm's exact duality gap, its unregularized gap DG₀ and its win rate
    against π_ref, and head-to-head."""
    series, names = summary["series"], list(summary["series"])
    h2h = summary["head_to_head"]
    header = (["iter"] + [f"gap {a}" for a in names] + [f"DG₀ {a}" for a in names]
              + [f"win vs ref {a}" for a in names] + list(h2h))
    lines = ["  ".join(f"{h:>14}" for h in header)]
    for t in range(len(series[names[0]])):
        cells = [str(t)] + [f"{series[a][t]['duality_gap']:.4f}" for a in names]
        cells += [f"{series[a][t]['unregularized_gap']:.4f}" for a in names]
        cells += [f"{series[a][t]['win_rate_vs_ref']:.3f}" for a in names]
        cells += [f"{values[t]:.3f}" for values in h2h.values()]
        lines.append("  ".join(f"{c:>14}" for c in cells))
    if not all(math.isfinite(series[a][-1]["duality_gap"]) for a in names):
        lines.append("warning: a non-finite duality gap")
    return "\n".join(lines)
