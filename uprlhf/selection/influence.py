"""LESS-style gradient influence of candidate samples on a validation set (DESIGN §1).

A candidate is worth labelling when a step on it would move the reward models the
way the validation data (held-out chosen responses) wants them to move. Each
sample's gradient of the ensemble-mean reward with respect to the refinable
parameters only (the LoRA matrices; the heads for head kinds) is projected to d
dimensions by a seeded Rademacher matrix (Johnson-Lindenstrauss keeps inner
products, so cosines survive), Adam-normalised for candidates with the optimiser
state saved at each reward-training checkpoint, and compared by cosine similarity.
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
from uprlhf.reward.training import MOMENTS_FILE, collate, encode_texts, on_device
from uprlhf.seeds import derive_seed

ADAM_BETAS = (0.9, 0.999)  # torch AdamW's defaults, which reward training uses
TRAINER_STATE = "trainer_state.json"


def influence_scores(train_grads: Tensor, val_grads_by_subtask: dict[str, Tensor], lr_weights: Tensor) -> Tensor:
    """Scores [N] of candidates from projected gradients.

    ``train_grads`` [C, N, d] (C checkpoints, Adam-normalised), each subtask's
    validation gradients [C, M, d], ``lr_weights`` [C]: per subtask, the cosine of
    each candidate with the subtask's mean validation gradient at each checkpoint,
    summed over checkpoints weighted by their mean learning rate; the max over subtasks.
    """
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
    return torch.stack(per_subtask).amax(0)


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
    """Per-sample gradients [B, P] of each sample's ensemble-mean reward, from one batched forward and backward.

    Every refinable parameter belongs to a linear layer, so sample b's gradient is
    the outer product of the layer's output gradient and input, summed over that
    sample's tokens (padding contributes nothing: no gradient reaches masked
    positions). Hooks collect inputs and output gradients; the batch sums rewards,
    whose backward keeps samples apart.
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
            torch.autograd.grad(rewards.mean(1).sum(), params)
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
    """Per-sample gradients of the ensemble-mean reward, [b, P] per batch of samples, in order."""
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
    costs one forward and backward per candidate and checkpoint.
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
    ):
        if not checkpoints:
            raise ValueError("influence needs at least one reward-training checkpoint")
        self.checkpoints = [InfluenceCheckpoint.load(p, device) for p in checkpoints]
        self.tokenizer, self.max_length, self.adam_eps = tokenizer, max_length, adam_eps
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
        return influence_scores(train, self.validation, self.lr_weights).cpu()
