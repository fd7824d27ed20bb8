"""LESS-style gradient influence of candidate samples on a validation set (DESIGN §1; paper 003 §3.2, §4.2).

Paper 003 (UGDA), Definition 1 and Eq. 11, after LESS (Xia et al., 2024): a step on
training sample z changes the loss of validation sample z' by −η⟨∇L(z'), Γ(z)⟩ to
first order (Eq. 4), Γ(z) being the Adam update m/√(v + ε) a step on ∇L(z) takes;
z's score for validation subtask j is Σ_i η̄_i cos(mean_{z'∈j} ∇L(z'; θ_i), Γ(z; θ_i))
over checkpoints θ_i, on LoRA gradients Rademacher-projected to d dimensions
(Johnson-Lindenstrauss keeps inner products). One L serves both sides, and the
paper does not say what it is here: its candidates are unlabelled policy samples,
its validation set holds chosen responses only (§5), and its refinement loss (Eq. 14,
MSE to the expert's label projected onto each member's quintiles) has a target
only after selection.

What we do: L is the refinement loss the selector trains on
(``mse_refinement_loss``) in expectation over the unknown label under the ensemble's
predictive distribution, whose mean is the ensemble mean r̄. That is
(1/K) Σ_k (r_k − r̄)², the ensemble's disagreement, plus a constant; its gradient is
the MSE's with r̄ as a fixed pseudo-label, (2/K) Σ_k (r_k − r̄) ∇r_k. A label R
common to the members adds 2(r̄ − R) ∇r̄, zero in expectation; for heads on a shared
backbone it moves no sample's disagreement to first order, so there the sign of the
score is the sign of the real step's effect, whatever the label. Validation samples
are unlabelled too and get the same L, so the target loss is the disagreement on
held-out chosen responses: a positive score says a step on the candidate lowers it
(to first order). A target on r̄ itself would be blind: for head kinds the expected
step does not move r̄ anywhere to first order, so every score would be ~0. Before,
both sides were gradients of r̄: a score said whether raising the candidate's reward
raised the validation rewards, not what refining on it would do.

Candidates' gradients are Adam-normalised with the optimiser state saved at each
reward-training checkpoint, validation gradients are plain; subtasks are combined by
their mean (the paper's experiments, §5) or max (its §4.2, Eq. 12). Member rewards
are taken in raw units, as the uncertainty filter's variance takes them (the
quantile projection's per-member scales are not modelled); K = 1 has no
disagreement and is refused.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from uprlhf.reward.ensembles import RewardEnsemble
from uprlhf.reward.losses import mse_refinement_loss
from uprlhf.reward.training import MOMENTS_FILE, collate, encode_texts, on_device
from uprlhf.seeds import derive_seed

ADAM_BETAS = (0.9, 0.999)  # torch AdamW's defaults, which reward training uses
TRAINER_STATE = "trainer_state.json"
AGGREGATIONS = ("mean", "max")  # over validation subtasks: the paper's experiments (§5), its §4.2 (Eq. 12)


def influence_scores(
    train_grads: Tensor, val_grads_by_subtask: dict[str, Tensor], lr_weights: Tensor, aggregation: str = "mean"
) -> Tensor:
    """Scores [N] of candidates from projected gradients.

    ``train_grads`` [C, N, d] (C checkpoints, Adam-normalised), each subtask's
    validation gradients [C, M, d], ``lr_weights`` [C]: per subtask, the cosine of
    each candidate with the subtask's mean validation gradient at each checkpoint,
    summed over checkpoints weighted by their mean learning rate (Eq. 11); then the
    mean or the max over subtasks (``aggregation``).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown subtask aggregation {aggregation!r}; allowed: {', '.join(map(repr, AGGREGATIONS))}")
    if not val_grads_by_subtask:
        raise ValueError("influence needs at least one validation subtask")
    c, n, d = train_grads.shape
    if lr_weights.shape != (c,):
        raise ValueError(f"lr_weights must be [{c}] (one per checkpoint), got {tuple(lr_weights.shape)}")
    per_subtask = []
    for name, val in val_grads_by_subtask.items():
        if val.ndim != 3 or val.shape[0] != c or val.shape[2] != d:
            raise ValueError(f"validation gradients of subtask {name!r} must be [{c}, M, {d}], got {tuple(val.shape)}")
        target = val.float().mean(1, keepdim=True)  # [C, 1, d]
        cosine = torch.nn.functional.cosine_similarity(train_grads.float(), target, dim=2)  # [C, N]
        per_subtask.append((lr_weights.float()[:, None] * cosine).sum(0))
    stacked = torch.stack(per_subtask)
    return stacked.mean(0) if aggregation == "mean" else stacked.amax(0)


def expected_refinement_loss(rewards: Tensor) -> Tensor:
    """Per-sample refinement loss [B] of member rewards [B, K] with the ensemble mean as the (fixed) label.

    The MSE refinement trains on, taken in expectation over a label whose mean is
    r̄, up to a constant: the ensemble's disagreement on the sample (module docstring).
    """
    pseudo = rewards.detach().mean(1, keepdim=True).expand_as(rewards)
    return torch.stack([mse_refinement_loss(r[None], t[None]) for r, t in zip(rewards, pseudo)])


class RademacherProjector:
    """x ↦ x R / √d with R a seeded ±1 matrix [P, d], generated in row blocks.

    The same seed gives the same R, so candidates and validation samples land in
    one space. Blocks are cached as int8 (P·d bytes) up to ``cache_bytes`` and
    regenerated past it, so large P·d costs time rather than memory.
    """

    def __init__(self, num_params: int, dim: int, seed: int, *, block_rows: int = 4096, cache_bytes: int = 2 << 30):
        self.num_params, self.dim, self.seed, self.block_rows = num_params, dim, seed, block_rows
        self.cache = num_params * dim <= cache_bytes
        self._blocks: dict[int, Tensor] = {}

    def _block(self, index: int) -> Tensor:
        block = self._blocks.get(index)
        if block is None:
            rows = min(self.block_rows, self.num_params - index * self.block_rows)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "projection block", index))
            block = torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8)
            if self.cache:
                self._blocks[index] = block
        return block.float().mul_(2).sub_(1)

    def project(self, grads: Tensor) -> Tensor:
        """[B, P] → [B, d], on the device of ``grads`` (blocks are drawn on the CPU, so every device sees the same R)."""
        if grads.shape[1] != self.num_params:
            raise ValueError(f"expected gradients over {self.num_params} parameters, got {grads.shape[1]}")
        out = torch.zeros(grads.shape[0], self.dim, device=grads.device)
        for index, start in enumerate(range(0, self.num_params, self.block_rows)):
            out.addmm_(grads[:, start : start + self.block_rows].float(), self._block(index).to(grads.device))
        return out / self.dim**0.5


@contextmanager
def gradients_of(ensemble: RewardEnsemble, params: list[nn.Parameter]):
    """Only ``params`` need gradients; every layer in eval mode, so gradients are deterministic.

    Eval mode on the layers turns off all dropout, attention's included (which
    checks its module's flag, not an ``nn.Dropout``). The forward takes the
    per-member path meant for gradients (``RewardEnsemble.per_member``).
    """
    flags = [(p, p.requires_grad) for p in ensemble.parameters()]
    was_training = ensemble.training
    ensemble.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with ensemble.per_member():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        ensemble.train(was_training)


def _linear_owners(ensemble: RewardEnsemble) -> list[tuple[nn.Linear, str]]:
    """(module, 'weight' | 'bias') for each refinable parameter, in ``refinable_parameters`` order."""
    owner = {}
    for module in ensemble.modules():
        if isinstance(module, nn.Linear):
            owner[id(module.weight)] = (module, "weight")
            if module.bias is not None:
                owner[id(module.bias)] = (module, "bias")
    out = []
    for name, p in ensemble.refinable_parameters():
        if id(p) not in owner:
            raise ValueError(f"refinable parameter {name} is not the weight or bias of a linear layer")
        out.append(owner[id(p)])
    return out


def batch_gradients(ensemble: RewardEnsemble, inputs: dict[str, Tensor]) -> Tensor:
    """Per-sample gradients [B, P] of each sample's ``expected_refinement_loss``, from one batched forward and backward.

    Every refinable parameter belongs to a linear layer, so sample b's gradient is
    the outer product of the layer's output gradient and input, summed over that
    sample's tokens (padding contributes nothing: no gradient reaches masked
    positions). Hooks collect inputs and output gradients; the backward of the
    summed per-sample losses keeps samples apart, since each loss depends on its own rewards only.
    """
    owners = _linear_owners(ensemble)
    modules = {id(m): m for m, _ in owners}
    seen: dict[int, list[tuple[Tensor, list[Tensor]]]] = {key: [] for key in modules}

    def capture(module: nn.Module, args: tuple, output: Tensor) -> None:
        grads: list[Tensor] = []
        output.register_hook(grads.append)
        seen[id(module)].append((args[0].detach(), grads))

    handles = [m.register_forward_hook(capture) for m in modules.values()]
    params = [p for _, p in ensemble.refinable_parameters()]
    try:
        with gradients_of(ensemble, params):
            rewards = ensemble(**on_device(inputs, params[0].device))
            torch.autograd.grad(expected_refinement_loss(rewards).sum(), params)
    finally:
        for handle in handles:
            handle.remove()
    columns = []
    for module, which in owners:
        total = None
        for x, (g,) in seen[id(module)]:
            x3, g3 = (x, g) if x.ndim == 3 else (x[:, None], g[:, None])
            part = torch.einsum("bto,bti->boi", g3, x3) if which == "weight" else g3.sum(1)
            total = part if total is None else total + part
        if total is None:
            raise RuntimeError("a refinable layer took no part in the forward pass")
        columns.append(total.reshape(total.shape[0], -1))
    return torch.cat(columns, 1)


def sample_gradients(
    ensemble: RewardEnsemble,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    *,
    max_length: int,
    batch_size: int = 32,
) -> Iterator[Tensor]:
    """Per-sample gradients of the expected refinement loss, [b, P] per batch of samples, in order."""
    encoded = encode_texts(tokenizer, prompts, responses, max_length)
    for start in range(0, len(encoded), batch_size):
        yield batch_gradients(ensemble, collate(tokenizer, encoded[start : start + batch_size]))


@dataclass
class InfluenceCheckpoint:
    """One reward-training checkpoint: its weights, mean learning rate and Adam moments (flat, in parameter order)."""

    path: Path
    ensemble: RewardEnsemble
    mean_lr: float
    exp_avg: Tensor | None
    exp_avg_sq: Tensor | None

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> InfluenceCheckpoint:
        path = Path(path)
        ensemble = RewardEnsemble.load(path).to(device)
        if not (path / TRAINER_STATE).exists():
            warnings.warn(f"{path}: no {TRAINER_STATE}; its mean learning rate is taken as 1.0 (equal weights)", stacklevel=2)
        state = json.loads((path / TRAINER_STATE).read_text()) if (path / TRAINER_STATE).exists() else {}
        names = [name for name, _ in ensemble.refinable_parameters()]
        exp_avg = exp_avg_sq = None
        if (path / MOMENTS_FILE).exists():
            moments = load_file(str(path / MOMENTS_FILE))
            missing = [n for n in names if f"{n}.exp_avg" not in moments]
            if missing:
                raise ValueError(f"{path / MOMENTS_FILE}: no Adam moments for {missing[:3]} ({len(missing)} parameters)")
            exp_avg = torch.cat([moments[f"{n}.exp_avg"].reshape(-1).float() for n in names]).to(device)
            exp_avg_sq = torch.cat([moments[f"{n}.exp_avg_sq"].reshape(-1).float() for n in names]).to(device)
        return cls(path, ensemble, float(state.get("mean_lr", 1.0)), exp_avg, exp_avg_sq)

    @property
    def has_moments(self) -> bool:
        return self.exp_avg is not None

    def adam_direction(self, grads: Tensor, eps: float) -> Tensor:
        """The Adam update a step on ``grads`` [B, P] would take from this checkpoint: m' / √(v' + ε)."""
        beta1, beta2 = ADAM_BETAS
        m = beta1 * self.exp_avg + (1 - beta1) * grads
        v = beta2 * self.exp_avg_sq + (1 - beta2) * grads.square()
        return m / (v + eps).sqrt()


def checkpoint_features(
    checkpoint: InfluenceCheckpoint,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    projector: RademacherProjector,
    *,
    max_length: int,
    adam_eps: float | None,
) -> Tensor:
    """Projected gradients [N, d] at one checkpoint; Adam-normalised when ``adam_eps`` is given and moments exist."""
    out = [torch.zeros(0, projector.dim)]
    for grads in sample_gradients(checkpoint.ensemble, tokenizer, prompts, responses, max_length=max_length):
        if adam_eps is not None and checkpoint.has_moments:
            grads = checkpoint.adam_direction(grads, adam_eps)
        out.append(projector.project(grads).cpu())
    return torch.cat(out)


class InfluenceRanker:
    """Scores candidates against a fixed validation set at the reward-training checkpoints.

    The validation gradients are computed once, at construction; each call then
    costs one forward and backward per candidate and checkpoint. ``aggregation``
    combines the subtasks' scores: mean or max.
    """

    def __init__(
        self,
        checkpoints: list[str | Path],
        tokenizer: PreTrainedTokenizerBase,
        validation: dict[str, tuple[list[str], list[str]]],
        *,
        dim: int,
        seed: int,
        adam_eps: float,
        max_length: int,
        device: torch.device | str = "cpu",
        aggregation: str = "mean",
    ):
        if not checkpoints:
            raise ValueError("influence needs at least one reward-training checkpoint")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown subtask aggregation {aggregation!r}; allowed: {', '.join(map(repr, AGGREGATIONS))}")
        self.checkpoints = [InfluenceCheckpoint.load(p, device) for p in checkpoints]
        if self.checkpoints[0].ensemble.k < 2:
            raise ValueError("influence needs an ensemble of at least 2 members: the expected refinement loss of one member has no gradient")
        self.tokenizer, self.max_length, self.adam_eps, self.aggregation = tokenizer, max_length, adam_eps, aggregation
        num_params = sum(p.numel() for _, p in self.checkpoints[0].ensemble.refinable_parameters())
        self.projector = RademacherProjector(num_params, dim, seed)
        self.lr_weights = torch.tensor([c.mean_lr for c in self.checkpoints])  # features come back on the CPU
        self.validation = {
            name: torch.stack(
                [checkpoint_features(c, tokenizer, prompts, responses, self.projector, max_length=max_length, adam_eps=None)
                 for c in self.checkpoints]
            )
            for name, (prompts, responses) in validation.items()
        }

    @property
    def adam_normalized(self) -> bool:
        return all(c.has_moments for c in self.checkpoints)

    def scores(self, prompts: list[str], responses: list[str]) -> Tensor:
        train = torch.stack(
            [checkpoint_features(c, self.tokenizer, prompts, responses, self.projector, max_length=self.max_length, adam_eps=self.adam_eps)
             for c in self.checkpoints]
        )
        return influence_scores(train, self.validation, self.lr_weights, self.aggregation).cpu()
