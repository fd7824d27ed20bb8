"""Scoring and held-out evaluation of a reward ensemble: accuracy, ECE, OOD AUROC, diversity."""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase

from uprlhf.reward.ensembles import MemberStats, RewardEnsemble, nuclear_diversity
from uprlhf.reward.metrics import expected_calibration_error, ood_auroc, preference_accuracy
from uprlhf.reward.training import collate, encode_texts, on_device
from uprlhf.seeds import derive_seed


@torch.inference_mode()
def score_texts(
    ensemble: RewardEnsemble,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    *,
    max_length: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Member rewards [N, K] of each (prompt, response), in batches."""
    ensemble.eval()
    encoded = encode_texts(tokenizer, prompts, responses, max_length)
    device = next(ensemble.parameters()).device
    out = [ensemble(**on_device(collate(tokenizer, encoded[i : i + batch_size]), device)) for i in range(0, len(encoded), batch_size)]
    return torch.cat(out).float().cpu()


# Training pairs whose two responses measure each member's reward mean and std (``member_stats``).
MEMBER_STATS_PAIRS = 1024


def member_stats(
    ensemble: RewardEnsemble, tokenizer: PreTrainedTokenizerBase, train_rows: list[dict], *, max_length: int, seed: int
) -> MemberStats:
    """Each member's reward mean and std over both responses of up to ``MEMBER_STATS_PAIRS`` training pairs (seeded)."""
    rows = train_rows if len(train_rows) <= MEMBER_STATS_PAIRS else random.Random(derive_seed(seed, "member stats")).sample(train_rows, MEMBER_STATS_PAIRS)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    return MemberStats.of(score_texts(ensemble, tokenizer, prompts, responses, max_length=max_length))


def _pair_and_ood_figures(chosen: torch.Tensor, rejected: torch.Tensor, ood: torch.Tensor) -> dict:
    diff = chosen.mean(1) - rejected.mean(1)
    on_task_std = torch.cat([chosen, rejected]).std(1, correction=0)
    return {
        "accuracy": preference_accuracy(diff),
        "ece": expected_calibration_error(diff),
        "ood_auroc": ood_auroc(on_task_std, ood.std(1, correction=0)),
        "uncertainty_on_task": float(on_task_std.mean()),
        "uncertainty_ood": float(ood.std(1, correction=0).mean()),
    }


def evaluate(
    ensemble: RewardEnsemble,
    tokenizer: PreTrainedTokenizerBase,
    test_rows: list[dict],
    ood_rows: list[dict],
    *,
    max_length: int,
) -> dict:
    """Figures of DESIGN §1 on held-out pairs; OOD AUROC of the member std, on-task vs ``ood_rows``.

    With ``ensemble.member_stats`` the same figures with each member standardised by them
    come as ``normalised_<figure>`` (one scoring pass: the standardisation is per-member affine).
    """
    normalise, ensemble.normalise = ensemble.normalise, False
    try:
        prompts = [r["prompt"] for r in test_rows]
        chosen = score_texts(ensemble, tokenizer, prompts, [r["chosen"] for r in test_rows], max_length=max_length)
        rejected = score_texts(ensemble, tokenizer, prompts, [r["rejected"] for r in test_rows], max_length=max_length)
        ood = score_texts(
            ensemble, tokenizer, [r["prompt"] for r in ood_rows], [r["response"] for r in ood_rows], max_length=max_length
        )
    finally:
        ensemble.normalise = normalise
    a_matrices = ensemble.lora_a_matrices()
    figures = {
        **_pair_and_ood_figures(chosen, rejected, ood),
        "diversity": nuclear_diversity(a_matrices).item() if a_matrices else None,
        "member_accuracy": [preference_accuracy(chosen[:, k] - rejected[:, k]) for k in range(chosen.shape[1])],
    }
    stats = ensemble.member_stats
    if stats is not None:
        normalised = _pair_and_ood_figures(stats.apply(chosen), stats.apply(rejected), stats.apply(ood))
        figures.update({f"normalised_{name}": value for name, value in normalised.items()})
    return figures


def pair_figures(
    ensemble: RewardEnsemble, tokenizer: PreTrainedTokenizerBase, pairs: list[dict], *, max_length: int
) -> dict[str, float]:
    """Accuracy and ECE of the ensemble mean on (prompt, chosen, rejected) pairs."""
    prompts = [r["prompt"] for r in pairs]
    chosen = score_texts(ensemble, tokenizer, prompts, [r["chosen"] for r in pairs], max_length=max_length)
    rejected = score_texts(ensemble, tokenizer, [r.get("rejected_prompt", r["prompt"]) for r in pairs],
                           [r["rejected"] for r in pairs], max_length=max_length)
    diff = chosen.mean(1) - rejected.mean(1)
    return {"accuracy": preference_accuracy(diff), "ece": expected_calibration_error(diff)}


def gold_pairs(prompts: list[str], responses: list[str], gold: list[float]) -> list[dict]:
    """Neighbouring policy samples paired, the one the gold scorer prefers as chosen; gold ties are left out.

    The two responses may answer different prompts, so each side keeps its own
    prompt (``rejected_prompt``): the pair asks which sample is better, as the gold does.
    """
    pairs = []
    for i in range(0, len(prompts) - 1, 2):
        a, b = (i, i + 1) if gold[i] > gold[i + 1] else (i + 1, i)
        if gold[a] == gold[b]:
            continue
        pairs.append({"prompt": prompts[a], "chosen": responses[a], "rejected_prompt": prompts[b], "rejected": responses[b]})
    return pairs
