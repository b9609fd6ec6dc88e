"""What an objective needs from the trainer beyond summed log-probs of (x, y_w, y_l): srpo and sparsepo.

`make_objective(config, pairs, tokenizer)` returns the object the training phase asks, at four points:

- `scored_pairs`: the pairs scored under π_ref through the log-prob cache before training (srpo:
  3N pairs, the six sequences of every pair; the others: the pairs themselves);
- `reference_columns(references)`: those scores as the loss's (N,) reference inputs;
- `attach(policy, device, resume_from, config)`: after the policy is loaded, before training (sparsepo:
  keeps π_ref in memory, builds the mask hooks or the mask network); `param_groups()` then holds
  the extra trainable parameters (the learned mask network, with its own weight decay);
- `collate(indices, pad_id)` and `batch_losses`: the micro-batch and its per-pair losses (None:
  the trainer's own `batch_losses` over collated or packed pairs);
- `save(directory)`: extra files of the final model (the learned mask network).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from nashalign import NashalignError
from nashalign.config import TrainConfig
from nashalign.data.packing import pack_pairs
from nashalign.data.tokenization import TokenizedPair, collate_pairs

MASK_FILE = "sparsepo_masks.safetensors"


class Objective:
    """The pairwise losses on summed log-probs (dpo, ipo, inpo, sppo): nothing beyond the pairs."""

    batch_losses = None

    def __init__(self, config: TrainConfig, pairs: list[TokenizedPair], tokenizer):
        self.config = config
        self.pairs = pairs
        self.scored_pairs = pairs

    def reference_columns(self, references: dict) -> dict[str, torch.Tensor]:
        return {f"{role}_{side}_logps": logps[side] for role, logps in references.items()
                for side in ("chosen", "rejected")}

    def attach(self, policy, device, resume_from: Path | None, num_processes: int) -> None:
        """Nothing to prepare."""

    def param_groups(self) -> list[dict]:
        return []

    def collate(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        chosen = [self.pairs[i] for i in indices]
        return (pack_pairs if self.config.data.packing else collate_pairs)(chosen, pad_id)

    def save(self, directory: Path) -> None:
        """Nothing beyond the model."""


class SRPOObjective(Objective):
    """Six sequences per pair: (x, y_w, y_l) and both responses as revisions of each (nashalign.train.srpo)."""

    def __init__(self, config: TrainConfig, pairs: list[TokenizedPair], tokenizer):
        from nashalign.train.srpo import revision_format, revision_pairs

        super().__init__(config, pairs, tokenizer)
        form = revision_format(tokenizer, config.loss.revision_instruction, config.loss.revision_template)
        self.scored_pairs = revision_pairs(pairs, tokenizer, form)

    def reference_columns(self, references: dict) -> dict[str, torch.Tensor]:
        from nashalign.train.srpo import split_blocks

        if set(references) != {"ref"}:
            raise NashalignError(f"loss 'srpo' is scored under π_ref only, got {sorted(references)}")
        return split_blocks(references["ref"], len(self.pairs), "ref")

    def collate(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        count = len(self.pairs)
        rows = [self.scored_pairs[block * count + i] for block in range(3) for i in indices]
        return (pack_pairs if self.config.data.packing else collate_pairs)(rows, pad_id)

    @staticmethod
    def batch_losses(model, batch, loss_fn, references):
        """Per-pair srpo losses (B,) of a batch of 3B pairs (three blocks, see srpo.revision_pairs)."""
        from nashalign.core.losses import loss_inputs
        from nashalign.data.logprobs import pair_logps
        from nashalign.train.srpo import split_blocks

        scored = pair_logps(model, batch)
        count = scored["chosen_logps"].shape[0] // 3
        policy = split_blocks({"chosen": scored["chosen_logps"], "rejected": scored["rejected_logps"]}, count, "policy")
        available = {**policy, **references, "chosen_lengths": scored["chosen_lengths"][:count],
                     "rejected_lengths": scored["rejected_lengths"][:count]}
        losses = loss_fn(**{name: available[name] for name in loss_inputs(loss_fn)})
        return losses, {"chosen_logps": policy["policy_chosen_logps"], "rejected_logps": policy["policy_rejected_logps"],
                        "chosen_lengths": available["chosen_lengths"]}


class SparsePOObjective(Objective):
    """Token-level masks and the full-vocabulary divergence term: π_ref stays in memory (nashalign.train.sparsepo)."""

    def __init__(self, config: TrainConfig, pairs: list[TokenizedPair], tokenizer):
        super().__init__(config, pairs, tokenizer)
        if config.data.packing:
            raise NashalignError("data.packing: loss 'sparsepo' needs padded batches; set data.packing: false")
        self.ref = self.recorder = self.network = None

    def attach(self, policy, device, resume_from: Path | None, num_processes: int) -> None:
        from nashalign.train.scoring import load_model
        from nashalign.train.sparsepo import ActivationRecorder, MaskNetwork

        loss, model = self.config.loss, self.config.model
        if loss.mask == "learned" and (resume_from is not None or num_processes > 1):
            raise NashalignError("loss.mask: learned sparsepo masks train in one process and cannot resume "
                                 "mid-run; use --resume never, one process, or loss.mask: activations")
        # π_ref: a separate model, or the policy's initial weights copied before any update.
        if model.ref_name_or_path is None and policy is None:
            raise NashalignError("loss 'sparsepo' keeps π_ref in memory: set model.ref_name_or_path when the "
                                 "reference log-probs are given precomputed")
        ref = load_model(model.ref_name_or_path, model) if model.ref_name_or_path else copy.deepcopy(policy)
        self.ref = ref.to(device).eval().requires_grad_(False)
        self.ref.config.use_cache = False
        if loss.mask == "activations":
            self.recorder = ActivationRecorder(self.ref, list(loss.mask_activations))
        else:
            ref_config = self.ref.config.get_text_config() if hasattr(self.ref.config, "get_text_config") else self.ref.config
            self.network = MaskNetwork(ref_config.hidden_size, ref_config.num_hidden_layers,
                                       outputs=1 if loss.shared_mask else 2).to(device)

    def param_groups(self) -> list[dict]:
        if self.network is None:
            return []
        return [{"params": list(self.network.parameters()), "weight_decay": self.config.loss.mask_weight_decay}]

    def batch_losses(self, model, batch, loss_fn, references):
        from nashalign.core.losses import loss_inputs
        from nashalign.train.sparsepo import sparsepo_inputs

        available = {**sparsepo_inputs(model, self.ref, batch, recorder=self.recorder, network=self.network),
                     **references}
        losses = loss_fn(**{name: available[name] for name in loss_inputs(loss_fn)})
        return losses, {key.removeprefix("policy_"): available[key] for key in
                        ("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths")}

    def save(self, directory: Path) -> None:
        if self.network is not None:
            from safetensors.torch import save_file

            save_file({key: value.detach().cpu().contiguous() for key, value in self.network.state_dict().items()},
                      str(Path(directory) / MASK_FILE))


OBJECTIVES = {"srpo": SRPOObjective, "sparsepo": SparsePOObjective}


def make_objective(config: TrainConfig, pairs: list[TokenizedPair], tokenizer) -> Objective:
    """The objective of `config.loss.name` over `pairs` (see the module docstring)."""
    return OBJECTIVES.get(config.loss.name, Objective)(config, pairs, tokenizer)
