"""Reward-model ensembles (DESIGN §1, Step 2): K members behind one [B, K] interface.

Each kind is a class in the ``ENSEMBLES`` registry. Training is a sequence of
phases (a shared warm-up, then the members); the kind says which parameters each
phase trains, on which slice of the pairs, and with which loss, so one training
loop (``uprlhf.reward.training``) serves every kind (``single``, one reward model,
included: it is the K = 1 baseline and goes wherever an ensemble does).

``forward`` scores every member at once where the kind can batch them (LoRA:
peft's per-row ``adapter_names``); gradients need the members one at a time,
which ``per_member_forward`` (set with ``with ensemble.per_member():``) asks for,
independently of nn.Module's train/eval mode.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from uprlhf.reward.config import EnsembleConfig, k_problem, prior_problem
from uprlhf.section import ModelConfig
from uprlhf.reward.losses import bradley_terry_loss, centering_penalty, member_bradley_terry_loss
from uprlhf.reward.priors import RandomPrior
from uprlhf.models import load_backbone, load_reward_model, load_tokenizer, pooled_text_features
from uprlhf.registry import Registry
from uprlhf.seeds import derive_seed

MANIFEST = "ensemble.json"
PRIOR_FILE = "prior.safetensors"
HEADS_FILE = "heads.safetensors"
# Manifest key of each member's reward mean and std on its training responses (``MemberStats``).
MEMBER_STATS = "member_stats"
Slice = Literal["all", "warmup", "rest"]


@dataclass(frozen=True)
class MemberStats:
    """Each member's reward mean and std over responses of its training pairs, measured after training.

    Members fitted by Bradley–Terry are free in level and scale, so their raw spread
    mixes disagreement with scale; standardising each member by these (``normalise``)
    makes u the spread in units of each member's own training spread.
    """

    mean: list[float]
    std: list[float]
    responses: int

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"member stats: {len(self.mean)} means but {len(self.std)} stds")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"member stats: every std must be > 0, got {self.std}")

    @classmethod
    def of(cls, rewards: Tensor) -> MemberStats:
        """The stats of member rewards [N, K] (population std, as u is)."""
        return cls(rewards.mean(0).tolist(), rewards.std(0, correction=0).clamp_min(1e-6).tolist(), rewards.shape[0])

    def apply(self, rewards: Tensor) -> Tensor:
        """Member rewards [B, K] standardised member by member."""
        mean = torch.tensor(self.mean, dtype=rewards.dtype, device=rewards.device)
        std = torch.tensor(self.std, dtype=rewards.dtype, device=rewards.device)
        return (rewards - mean) / std


def _write_manifest(path: Path, manifest: dict) -> None:
    """The manifest written whole and atomically: a reader never sees half of it."""
    from uprlhf.atomic import atomic_write

    atomic_write(path / MANIFEST, lambda handle: handle.write(json.dumps(manifest, indent=2)), binary=False)


def write_member_stats(path: str | Path, stats: MemberStats) -> None:
    """Add ``stats`` to the manifest of the checkpoint at ``path``."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if len(stats.mean) != manifest["k"]:
        raise ValueError(f"{path / MANIFEST}: K is {manifest['k']} but the stats have {len(stats.mean)} members")
    _write_manifest(path, {**manifest, MEMBER_STATS: asdict(stats)})


def nuclear_diversity(a_matrices: list[list[Tensor]]) -> Tensor:
    """(1/M) Σ_m ‖A_m‖_* / ‖A_m‖_F, A_m the members' r×d LoRA A matrices stacked on the rank axis.

    Near 1 when the members' matrices span the same rows, up to sqrt(rank A_m) when
    they are orthogonal; differentiable, so training can maximise it.
    """
    if not a_matrices or any(not members for members in a_matrices):
        raise ValueError("nuclear_diversity needs at least one module with at least one member")
    ratios = []
    for members in a_matrices:
        stacked = torch.cat(list(members), dim=0)
        ratios.append(torch.linalg.matrix_norm(stacked, ord="nuc") / torch.linalg.matrix_norm(stacked, ord="fro"))
    return torch.stack(ratios).mean()


@dataclass
class PairBatch:
    """Tokenised (prompt, chosen) and (prompt, rejected) for one batch of pairs."""

    chosen: dict[str, Tensor]
    rejected: dict[str, Tensor]
    weights: Tensor | None = None  # [B, K] per-member pair weights (bootstrap)
    pad_id: int = 0  # the tokenizer's pad token: decoder rewards read the last non-pad token

    def joined(self) -> dict[str, Tensor]:
        """Chosen rows then rejected rows, right-padded to one length, for a single forward."""
        width = max(self.chosen["input_ids"].shape[1], self.rejected["input_ids"].shape[1])

        def pad(key: str, t: Tensor) -> Tensor:
            value = self.pad_id if key == "input_ids" else 0
            return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return {key: torch.cat([pad(key, self.chosen[key]), pad(key, self.rejected[key])]) for key in self.chosen}

    def split(self, score: Callable[[dict[str, Tensor]], Tensor]) -> tuple[Tensor, Tensor]:
        """``score`` run once on the joined rows, cut back into (chosen, rejected)."""
        rewards = score(self.joined())
        n = self.chosen["input_ids"].shape[0]
        return rewards[:n], rewards[n:]


@dataclass
class Phase:
    """One stage of training: what it trains, on which pairs, with which loss."""

    name: str
    data: Slice
    per_member_batches: bool  # True: member k sees its own shuffle of the pairs
    loss: Callable[[list[PairBatch]], Tensor]
    # Sets the model up for the phase (attaches adapters, re-seeds heads, freezes and
    # unfreezes parameters) and returns the optimiser's parameter groups; call it once, on entry.
    prepare: Callable[[], list[dict]]


def _ensemble_kind(name: str, cls: type[RewardEnsemble]) -> type[RewardEnsemble]:
    cls.kind = name
    return cls


# LoRA A initialisations by ``EnsembleConfig.lora_init``, as peft's ``init_lora_weights`` names them.
LORA_INIT: dict[str, bool | str] = {"kaiming": True, "gaussian": "gaussian"}


# ``@ENSEMBLES.register("kind")`` on a ``RewardEnsemble`` subclass (which gets ``kind`` set).
ENSEMBLES: Registry[type[RewardEnsemble]] = Registry("ensemble kind", make=_ensemble_kind)


def ensemble_class(kind: str) -> type[RewardEnsemble]:
    """The ensemble class registered as ``kind``."""
    return ENSEMBLES.get(kind)


def kinds_with_head_inputs() -> list[str]:
    """The kinds whose members are heads on one shared layer (``RewardEnsemble.head_inputs``)."""
    return [name for name in ENSEMBLES.names() if ensemble_class(name).head_inputs is not RewardEnsemble.head_inputs]


class RewardEnsemble(nn.Module, ABC):
    """K reward members; ``forward`` returns member rewards [B, K]."""

    kind: ClassVar[str]
    # The K every instance has (``single``: 1); None: ``cfg.k`` members.
    fixed_k: ClassVar[int | None] = None
    # True: each member's reward is fitted by a loss of its own, so a randomized prior is fitted away on the
    # pairs (``prior_problem``); False: the members' mean is trained as one predictor.
    fits_each_member: ClassVar[bool] = True

    def __init__(
        self,
        backbone: ModelConfig,
        cfg: EnsembleConfig,
        lr: float,
        head_lr: float,
        seed: int,
        *,
        from_backbone: bool = True,
    ):
        problem = k_problem(self.kind, cfg.k) or prior_problem(self.kind, cfg.prior_scale) or self.shape_problem(cfg)
        if problem:
            raise ValueError(problem)
        super().__init__()
        self.backbone_cfg = backbone
        self.cfg = cfg
        self.k = cfg.k
        self.lr = lr
        self.head_lr = head_lr
        self.seed = seed
        # True: ``forward`` runs the members one at a time (what gradients need); False: it may
        # batch them (scoring). Chosen by the caller, not by train/eval mode: see ``per_member``.
        self.per_member_forward = False
        # Randomized prior functions (EnsembleConfig.prior_scale): fixed, never trained, saved with the weights.
        self.prior = RandomPrior(self.k, seed) if cfg.prior_scale > 0 else None
        # Measured after training (``write_member_stats``); ``forward`` standardises by them when ``normalise``.
        self.member_stats: MemberStats | None = None
        self.normalise = False
        if from_backbone:
            self.init_from_backbone()

    @classmethod
    def shape_problem(cls, cfg: EnsembleConfig, key: str = "ensemble") -> str | None:
        """One line when this kind cannot be built in the shape ``cfg`` (beyond K and priors), else None."""
        return None

    @contextmanager
    def per_member(self, enabled: bool = True):
        """Within the block, ``forward`` runs the members one at a time (training, influence, refinement)."""
        previous = self.per_member_forward
        self.per_member_forward = enabled
        try:
            yield self
        finally:
            self.per_member_forward = previous

    @abstractmethod
    def init_from_backbone(self) -> None:
        """Build the members from the pretrained backbone; a loaded checkpoint skips this."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Member rewards [B, K]: the trained members' plus their fixed priors' (when ``prior_scale`` > 0),
        standardised by ``member_stats`` when ``normalise`` is set."""
        rewards = self.members_forward(input_ids, attention_mask, token_type_ids)
        if self.prior is not None:
            rewards = rewards + self.prior_term({"input_ids": input_ids, "attention_mask": attention_mask})
        return self.member_stats.apply(rewards) if self.normalise else rewards

    @abstractmethod
    def members_forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """The trained members' rewards [B, K], without the priors."""

    def head_inputs(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """[B, H]: the features every member's head reads, for kinds whose members are heads on one shared layer."""
        raise ValueError(f"kind {self.kind!r} has no one layer that every member's head reads; kinds that have: "
                         f"{', '.join(kinds_with_head_inputs())}")

    def centred(self, loss: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
        """``loss`` plus η·mean((r⁺ + r⁻)²) over pairs and members (``reward_centering``; Eisenstein et al. 2023):
        Bradley–Terry fits only each pair's difference, and this pins each member's level on the pairs as well."""
        eta = self.cfg.reward_centering
        return loss if eta == 0 else loss + eta * centering_penalty(chosen, rejected)

    def prior_term(self, inputs: dict[str, Tensor | None], k: int | None = None) -> Tensor | float:
        """β·p(x), [B, K] (or member k's, [B]), for a loss that scores the members itself; 0 without priors."""
        if self.prior is None:
            return 0.0
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prior = self.prior(ids, mask) if k is None else self.prior.column(ids, mask, k)
        return self.cfg.prior_scale * prior

    @abstractmethod
    def phases(self) -> list[Phase]:
        """The training stages, in order; the last one is checkpointed."""

    @abstractmethod
    def save_weights(self, path: Path) -> None:
        """Weights as safetensors / PEFT folders under ``path``."""

    @abstractmethod
    def load_weights(self, path: Path) -> None:
        """The inverse of ``save_weights``."""

    def lora_a_matrices(self) -> list[list[Tensor]]:
        """Per LoRA module, the members' A matrices; empty for kinds without LoRA."""
        return []

    def member_parameter_count(self) -> int:
        """Parameters that belong to one member or another (not the shared part)."""
        return sum(p.numel() for p in self.parameters())

    def refinable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What the selector differentiates for influence and fine-tunes when refining: the heads here."""
        heads = {
            id(p)
            for m in self.modules()
            if isinstance(m, PreTrainedModel) and isinstance(getattr(m, "classifier", getattr(m, "score", None)), nn.Linear)
            for p in _classifier(m).parameters()
        }
        return [(name, p) for name, p in self.named_parameters() if id(p) in heads]

    def score_pairs(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        return batch.split(lambda inputs: self(**inputs))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save_weights(path)
        if self.prior is not None:
            save_file({name: t.contiguous() for name, t in self.prior.state_dict().items()}, str(path / PRIOR_FILE))
        manifest = {
            "kind": self.kind,
            "k": self.k,
            "backbone": self.backbone_cfg.model_dump(),
            "ensemble": self.cfg.model_dump(),
        }
        if self.member_stats is not None:
            manifest[MEMBER_STATS] = asdict(self.member_stats)
        _write_manifest(path, manifest)  # last: a manifest means the weights are there

    @staticmethod
    def load(path: str | Path, *, normalise: bool = False) -> RewardEnsemble:
        """Rebuild an ensemble saved with ``save``; weights come from safetensors only.

        ``normalise``: score with each member standardised by its training stats, which the
        checkpoint must hold (``jobs.train_reward`` writes them; ``member_stats_problem``)."""
        path = Path(path)
        manifest = json.loads((path / MANIFEST).read_text())
        cls = ensemble_class(manifest["kind"])
        ens = cls(
            ModelConfig(**manifest["backbone"]), EnsembleConfig(**manifest["ensemble"]), 0.0, 0.0, 0, from_backbone=False
        )
        ens.load_weights(path)
        if ens.prior is not None:
            ens.prior.load_state_dict(load_file(str(path / PRIOR_FILE)))
        if MEMBER_STATS in manifest:
            ens.member_stats = MemberStats(**manifest[MEMBER_STATS])
        if normalise:
            if ens.member_stats is None:
                raise ValueError(member_stats_problem(path))
            ens.normalise = True
        return ens.eval()


def member_stats_problem(path: str | Path) -> str | None:
    """One line when the checkpoint at ``path`` holds no member stats to normalise by, else None."""
    manifest_path = Path(path) / MANIFEST
    if MEMBER_STATS not in json.loads(manifest_path.read_text()):
        return (f"{manifest_path}: no {MEMBER_STATS} to normalise the members by (jobs.train_reward writes them "
                "after training); set reward_normalise=false or retrain")
    return None


def _seed_member_heads(head: nn.Linear, seed: int, first: int = 0) -> None:
    """Row j of ``head`` is member (first + j)'s head, N(0, 0.02²) from that member's own seed; bias 0.

    Seeded per member, so member k's starting head is the same whichever kind or K it is in.
    """
    with torch.no_grad():
        for j in range(head.out_features):
            gen = torch.Generator().manual_seed(derive_seed(seed, "member head", first + j))
            head.weight[j].copy_(torch.randn(head.in_features, generator=gen) * 0.02)
        if head.bias is not None:
            head.bias.zero_()


def _classifier(model: PreTrainedModel) -> nn.Linear:
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"{type(model).__name__} has no linear 'classifier' or 'score' head")


def _set_classifier(model: PreTrainedModel, head: nn.Linear) -> str:
    """Put ``head`` where ``_classifier`` finds it; returns the attribute's name."""
    name = "classifier" if isinstance(getattr(model, "classifier", None), nn.Linear) else "score"
    setattr(model, name, head)
    return name


def _head_row(heads: nn.Linear, k: int) -> nn.Linear:
    """A one-output copy of output ``k`` of ``heads``."""
    head = nn.Linear(heads.in_features, 1, bias=heads.bias is not None, device=heads.weight.device, dtype=heads.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(heads.weight[k : k + 1])
        if heads.bias is not None:
            head.bias.copy_(heads.bias[k : k + 1])
    return head


def _train_everything(module: nn.Module, lr: float) -> list[dict]:
    """Unfreeze every weight of ``module``, all trained at ``lr``."""
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    return [{"params": params, "lr": lr}]


def _unfreeze_whole_model(model: PreTrainedModel, lr: float, head_lr: float) -> list[dict]:
    """Unfreeze every weight of ``model``; the groups train the body at ``lr``, the head at ``head_lr``."""
    for p in model.parameters():
        p.requires_grad_(True)
    head = list(_classifier(model).parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": body, "lr": lr}, {"params": head, "lr": head_lr}]


def _seq_logits(model: nn.Module, **inputs: Tensor | None) -> Tensor:
    kwargs = {k: v for k, v in inputs.items() if v is not None}
    return model(**kwargs).logits


@ENSEMBLES.register("independent")
class IndependentEnsemble(RewardEnsemble):
    """K full reward models from the same backbone, each head seeded differently."""

    def init_from_backbone(self) -> None:
        members = []
        for k in range(self.k):
            model = load_reward_model(self.backbone_cfg, num_labels=1)
            _seed_member_heads(_classifier(model), self.seed, first=k)
            members.append(model)
        self.members = nn.ModuleList(members)

    def members_forward(self, input_ids, attention_mask, token_type_ids=None):
        return torch.cat(
            [_seq_logits(m, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids) for m in self.members],
            dim=1,
        )

    def phases(self) -> list[Phase]:
        def loss(batches: list[PairBatch]) -> Tensor:
            chosen, rejected, weights = [], [], []
            for k, (member, batch) in enumerate(zip(self.members, batches, strict=True)):
                c, r = batch.split(lambda inputs, m=member, k=k: _seq_logits(m, **inputs)[:, 0] + self.prior_term(inputs, k))
                chosen.append(c)
                rejected.append(r)
                if batch.weights is not None:
                    weights.append(batch.weights[:, k])
            w = torch.stack(weights, 1) if weights else None
            chosen, rejected = torch.stack(chosen, 1), torch.stack(rejected, 1)
            return self.centred(member_bradley_terry_loss(chosen, rejected, w), chosen, rejected)

        return [Phase("members", "all", True, loss, lambda: _train_everything(self, self.lr))]

    def save_weights(self, path: Path) -> None:
        for k, member in enumerate(self.members):
            member.save_pretrained(path / f"member_{k}", safe_serialization=True)

    def load_weights(self, path: Path) -> None:
        self.members = nn.ModuleList(
            AutoModelForSequenceClassification.from_pretrained(path / f"member_{k}") for k in range(self.k)
        )


class _SharedBackboneEnsemble(RewardEnsemble):
    """One transformer with K scalar heads (a sequence classifier with K labels)."""

    def init_from_backbone(self) -> None:
        self.model = load_reward_model(self.backbone_cfg, num_labels=self.k)
        head = _classifier(self.model)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            head.bias.zero_()

    def members_forward(self, input_ids, attention_mask, token_type_ids=None):
        return _seq_logits(self.model, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def head_inputs(self, input_ids, attention_mask, token_type_ids=None):
        seen: list[Tensor] = []
        hook = _classifier(self.model).register_forward_hook(lambda module, args, output: seen.append(args[0]))
        try:
            _seq_logits(self.model, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        finally:
            hook.remove()
        return seen[0]

    def _member_loss(self, batches: list[PairBatch]) -> Tensor:
        (batch,) = batches
        chosen, rejected = self.score_pairs(batch)
        return self.centred(member_bradley_terry_loss(chosen, rejected, batch.weights), chosen, rejected)

    def member_parameter_count(self) -> int:
        return sum(p.numel() for p in _classifier(self.model).parameters())

    def save_weights(self, path: Path) -> None:
        self.model.save_pretrained(path / "model", safe_serialization=True)

    def load_weights(self, path: Path) -> None:
        self.model = AutoModelForSequenceClassification.from_pretrained(path / "model")


@ENSEMBLES.register("linear")
class LinearEnsemble(_SharedBackboneEnsemble):
    """Shared transformer trained jointly with K linear heads, each head its own BT loss."""

    def phases(self) -> list[Phase]:
        def prepare() -> list[dict]:
            return _unfreeze_whole_model(self.model, self.lr, self.head_lr)

        return [Phase("joint", "all", False, self._member_loss, prepare)]


@ENSEMBLES.register("frozen_heads")
class FrozenHeadsEnsemble(_SharedBackboneEnsemble):
    """Fine-tune one reward model, freeze its backbone, then train K heads on top."""

    def phases(self) -> list[Phase]:
        head = _classifier(self.model)

        def backbone_loss(batches: list[PairBatch]) -> Tensor:
            (batch,) = batches
            chosen, rejected = self.score_pairs(batch)
            return self.centred(bradley_terry_loss(chosen, rejected), chosen, rejected)

        def prepare_backbone() -> list[dict]:
            return _unfreeze_whole_model(self.model, self.lr, self.head_lr)

        def prepare_heads() -> list[dict]:
            for p in self.model.parameters():
                p.requires_grad_(False)
            _seed_member_heads(head, self.seed)
            for p in head.parameters():
                p.requires_grad_(True)
            return [{"params": list(head.parameters()), "lr": self.head_lr}]

        return [
            Phase("backbone", "all", False, backbone_loss, prepare_backbone),
            Phase("heads", "all", False, self._member_loss, prepare_heads),
        ]


class _LoraEnsemble(RewardEnsemble):
    """A shared backbone warmed up with K linear heads, plus K LoRA adapters, member k starting from head k.

    As Algorithm 1 of efficient reward-model ensembles (paper 001): the warm-up is a
    linear-layer ensemble (backbone and K seeded heads, each head its own BT loss),
    so the members start apart. peft keeps one head per adapter (``modules_to_save``)
    and runs all K members in one batch with per-row ``adapter_names`` when scoring.
    """

    def init_from_backbone(self) -> None:
        self.base = load_reward_model(self.backbone_cfg, num_labels=self.k)
        _seed_member_heads(_classifier(self.base), self.seed)
        self.peft: PeftModel | None = None

    @property
    def names(self) -> list[str]:
        return [f"m{k}" for k in range(self.k)]

    def _lora_config(self) -> LoraConfig:
        layers = None
        if self.cfg.lora_top_layers is not None:
            n_layers = self.base.config.num_hidden_layers
            layers = list(range(max(0, n_layers - self.cfg.lora_top_layers), n_layers))
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=list(self.cfg.lora_target_modules),
            layers_to_transform=layers,
            init_lora_weights=LORA_INIT[self.cfg.lora_init],
        )

    def attach_adapters(self) -> None:
        """Wrap the warmed-up base with K adapters: A matrices differ by seed, B start at 0, and
        member k's head is warm-up head k, so at the start member k scores as head k did.

        The base keeps a one-output head (head 0; peft's original module, which no member reads).
        """
        heads = _classifier(self.base)
        head_name = _set_classifier(self.base, _head_row(heads, 0))
        self.base.config.num_labels = 1
        config = self._lora_config()
        for k, name in enumerate(self.names):
            torch.manual_seed(derive_seed(self.seed, "member adapter", k))
            if self.peft is None:
                self.peft = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        member_heads = getattr(self.base, head_name).modules_to_save
        for k, name in enumerate(self.names):
            member_heads[name].load_state_dict(_head_row(heads, k).state_dict())
        self._member_params = [p for n, p in self.peft.named_parameters() if _is_member_param(n, self.names)]

    def set_member(self, k: int) -> None:
        """Route the forward through member k; every member stays trainable for joint losses."""
        self.peft.base_model.set_adapter(self.names[k])
        for p in self._member_params:
            p.requires_grad_(True)

    def _split(self) -> int | None:
        """First layer with adapters, when the frozen layers below it can run once for all members.

        Needs an encoder laid out as ``embeddings`` + ``encoder.layer`` (BERT family)
        and ``lora_top_layers``; otherwise every member runs the whole model.
        """
        if self.cfg.lora_top_layers is None:
            return None
        body = self.peft.get_base_model().base_model
        layers = getattr(getattr(body, "encoder", None), "layer", None)
        if layers is None or not hasattr(body, "embeddings"):
            return None
        split = len(layers) - self.cfg.lora_top_layers
        return split if split > 0 else None

    @contextmanager
    def _only_layers(self, which: slice, hidden: Tensor | None = None):
        """Run only encoder layers ``which``; with ``hidden``, it replaces the embeddings' output."""
        body = self.peft.get_base_model().base_model
        layers, embeddings = body.encoder.layer, body.embeddings
        body.encoder.layer = nn.ModuleList(list(layers)[which])
        if hidden is not None:
            body.embeddings = _FixedOutput(hidden)
        try:
            yield
        finally:
            body.encoder.layer, body.embeddings = layers, embeddings

    def _prefix(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """Hidden states after the adapter-free lower layers, computed once (no grad: frozen)."""
        split = self._split()
        if split is None:
            return None
        with torch.no_grad(), self._only_layers(slice(0, split)):
            return self.peft.get_base_model().base_model(**inputs).last_hidden_state

    def _upper(self, prefix: Tensor | None):
        if prefix is None:
            return nullcontext()
        return self._only_layers(slice(self._split(), None), prefix)

    def _member_rewards(self, inputs: dict[str, Tensor], k: int, prefix: Tensor | None) -> Tensor:
        """Member k alone, [B], reusing ``prefix`` for the frozen lower layers."""
        self.set_member(k)
        with self._upper(prefix):
            return _seq_logits(self.peft, **inputs)[:, 0]

    def members_forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.peft is None:
            raise RuntimeError("LoRA ensemble has no adapters yet; train or load it first")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        prefix = self._prefix(inputs)
        if self.per_member_forward:
            return torch.stack([self._member_rewards(inputs, k, prefix) for k in range(self.k)], 1)
        if self.peft.training:
            raise RuntimeError(
                "a LoRA ensemble in training mode cannot batch its members (peft refuses adapter_names "
                "while training); run the forward inside `with ensemble.per_member():`"
            )
        b = input_ids.shape[0]
        repeated = {key: value.repeat(self.k, 1) for key, value in inputs.items()}
        names = [name for name in self.names for _ in range(b)]
        with self._upper(None if prefix is None else prefix.repeat(self.k, 1, 1)):
            logits = self.peft(**repeated, adapter_names=names).logits
        return logits[:, 0].view(self.k, b).T

    def _warmup_phase(self) -> Phase:
        """The linear-layer ensemble of Algorithm 1 line 14: backbone and K heads, each head its own BT loss."""

        def loss(batches: list[PairBatch]) -> Tensor:
            (batch,) = batches
            chosen, rejected = batch.split(lambda inputs: _seq_logits(self.base, **inputs) + self.prior_term(inputs))
            return self.centred(member_bradley_terry_loss(chosen, rejected), chosen, rejected)

        def prepare() -> list[dict]:
            return _unfreeze_whole_model(self.base, self.lr, self.head_lr)

        return Phase("warmup", "warmup", False, loss, prepare)

    def _prepare_members(self) -> list[dict]:
        """Attach the K adapters and train only the members' parameters (LoRA matrices and heads)."""
        self.attach_adapters()
        for p in self.peft.parameters():
            p.requires_grad_(False)
        for p in self._member_params:
            p.requires_grad_(True)
        return [{"params": self._member_params, "lr": self.head_lr}]

    def lora_a_matrices(self) -> list[list[Tensor]]:
        if self.peft is None:
            return []
        modules = []
        for module in self.peft.modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, nn.ModuleDict) and all(n in lora_a for n in self.names):
                modules.append([lora_a[n].weight for n in self.names])
        return modules

    def member_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.peft.named_parameters() if _is_member_param(n, self.names))

    def refinable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The members' LoRA matrices only (LESS differentiates the adapters, not the heads)."""
        return [
            (name, p)
            for name, p in self.named_parameters()
            if (".lora_A." in name or ".lora_B." in name) and _is_member_param(name, self.names)
        ]

    def save_weights(self, path: Path) -> None:
        """The shared base as a plain HF model (LoRA wrappers stripped), the adapters as PEFT."""
        base_state = {}
        for name, tensor in self.peft.get_base_model().state_dict().items():
            if "lora_" in name or ".modules_to_save." in name:
                continue
            base_state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor.contiguous()
        (path / "base").mkdir(parents=True, exist_ok=True)
        self.base.config.save_pretrained(path / "base")
        save_file(base_state, str(path / "base" / "model.safetensors"), metadata={"format": "pt"})
        self.peft.save_pretrained(path / "adapters", safe_serialization=True)

    def load_weights(self, path: Path) -> None:
        self.base = AutoModelForSequenceClassification.from_pretrained(path / "base")
        self.peft = None
        for name in self.names:
            adapter_dir = path / "adapters" / name
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=name)
            else:
                self.peft.load_adapter(adapter_dir, adapter_name=name)
        self._member_params = [p for n, p in self.peft.named_parameters() if _is_member_param(n, self.names)]


class _FixedOutput(nn.Module):
    """Stands in for the embeddings so the upper layers start from precomputed hidden states."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> Tensor:
        return self.hidden


def _is_member_param(name: str, members: list[str]) -> bool:
    parts = name.split(".")
    return any(m in parts for m in members)


@ENSEMBLES.register("lora")
class LoraEnsemble(_LoraEnsemble):
    """Warm up the shared backbone on a slice, then K LoRA members each on its own shuffle of the rest."""

    def phases(self) -> list[Phase]:
        def loss(batches: list[PairBatch]) -> Tensor:
            chosen, rejected = [], []
            for k, batch in enumerate(batches):
                c, r = batch.split(
                    lambda inputs, k=k: self._member_rewards(inputs, k, self._prefix(inputs)) + self.prior_term(inputs, k)
                )
                chosen.append(c)
                rejected.append(r)
            chosen, rejected = torch.stack(chosen, 1), torch.stack(rejected, 1)
            return self.centred(member_bradley_terry_loss(chosen, rejected), chosen, rejected)

        return [self._warmup_phase(), Phase("members", "rest", True, loss, self._prepare_members)]


@ENSEMBLES.register("diverse_lora")
class DiverseLoraEnsemble(_LoraEnsemble):
    """LoRA members trained jointly: BT on the ensemble mean minus λ·nuclear-norm diversity."""

    fits_each_member = False

    def phases(self) -> list[Phase]:
        def loss(batches: list[PairBatch]) -> Tensor:
            (batch,) = batches
            chosen, rejected = self.score_pairs(batch)
            fit = self.centred(bradley_terry_loss(chosen, rejected), chosen, rejected)
            return fit - self.cfg.nnm_lambda * nuclear_diversity(self.lora_a_matrices())

        return [self._warmup_phase(), Phase("members", "rest", False, loss, self._prepare_members)]


@ENSEMBLES.register("single")
class SingleRewardModel(IndependentEnsemble):
    """One reward model (K = 1), trained as one independent member: the baseline every paper compares against.

    Its rewards are [B, 1] (std 0), so it scores, trains and is refined wherever an
    ensemble is. Never bootstrapped: a resample is how independent members differ.
    """

    fixed_k = 1

    def phases(self) -> list[Phase]:
        (model,) = self.members

        def loss(batches: list[PairBatch]) -> Tensor:
            (batch,) = batches
            chosen, rejected = batch.split(lambda inputs: _seq_logits(model, **inputs)[:, 0] + self.prior_term(inputs, 0))
            return self.centred(bradley_terry_loss(chosen, rejected), chosen, rejected)

        return [Phase("model", "all", False, loss, lambda: _train_everything(self, self.lr))]


class _FrozenBackboneBlock(nn.Module):
    """One block of ``multi_backbone`` members: linear heads over a frozen pretrained backbone, reading the text
    through that backbone's own tokenizer.

    The features are ``pooled_text_features``, [B, 2H]. The backbone runs without gradients
    and stays in eval mode, so a training step costs one forward of it, and none once the text's features are
    in ``feature_cache``: they never change, so training's later epochs read them back.
    """

    # Texts whose features are kept; past this, new texts are scored without being kept (a training set that
    # fits is read back every epoch; the policy's ever-new samples would only push it out).
    CACHED_TEXTS = 16384

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, k: int):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        # The decoded text is as long as the reward tokenizer's truncation left it; cut only at this backbone's limit.
        self.max_length = min(tokenizer.model_max_length, getattr(backbone.config, "max_position_embeddings", 512))
        self.heads = nn.Linear(2 * backbone.config.hidden_size, k)
        self.feature_cache: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> _FrozenBackboneBlock:
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, texts: list[str]) -> Tensor:
        """[B, 2H] features of ``texts``, from the cache where it has them."""
        missing = [text for text in dict.fromkeys(texts) if text not in self.feature_cache]
        computed = {}
        if missing:
            computed = dict(zip(missing, pooled_text_features(self.backbone, self.tokenizer, missing, self.max_length), strict=True))
        for text, row in computed.items():
            if len(self.feature_cache) < self.CACHED_TEXTS:
                self.feature_cache[text] = row.clone()
        return torch.stack([computed[text] if text in computed else self.feature_cache[text] for text in texts])

    def forward(self, texts: list[str]) -> Tensor:
        return self.heads(self.features(texts).to(self.heads.weight))

    def save(self, path: Path) -> None:
        self.backbone.save_pretrained(path / "backbone", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "backbone")
        save_file({name: t.contiguous() for name, t in self.heads.state_dict().items()}, str(path / HEADS_FILE))

    @classmethod
    def load(cls, path: Path, k: int, *, trust_remote_code: bool) -> _FrozenBackboneBlock:
        source = ModelConfig(name_or_path=str(path / "backbone"), trust_remote_code=trust_remote_code)
        block = cls(load_backbone(source), load_tokenizer(source), k)
        block.heads.load_state_dict(load_file(str(path / HEADS_FILE)))
        return block


def member_blocks(k: int, backbones: int) -> list[int]:
    """Members per backbone when K members are dealt in contiguous, near-equal blocks (earlier blocks take the rest)."""
    return [k // backbones + (i < k % backbones) for i in range(backbones)]


@ENSEMBLES.register("multi_backbone")
class MultiBackboneEnsemble(_SharedBackboneEnsemble):
    """Members on different pretrained backbones: a first block of heads on the reward backbone, fine-tuned with
    it as in kind ``linear`` (each head seeded per member), then one block of linear heads per frozen
    ``member_backbones`` entry.

    Why: members that share one pretrained backbone share its errors, so on text none of them was trained on
    they agree, confidently, on the same wrong reward (Eisenstein et al. 2023 find pretraining-seed diversity
    beats fine-tuning-seed diversity). A block on another backbone extrapolates from other features. Each
    further backbone reads the text decoded from the reward tokenizer's ids and re-encoded with its own
    tokenizer, so the ensemble keeps the one [B, T] interface every caller uses; it stays frozen because
    fine-tuning a second transformer is what a 2-core budget cannot pay for. The blocks' rewards live on
    different scales: score it with ``reward_normalise`` so that u is their disagreement, not their offsets.
    """

    @classmethod
    def shape_problem(cls, cfg: EnsembleConfig, key: str = "ensemble") -> str | None:
        if not cfg.member_backbones:
            return f"{key}.member_backbones must name at least one further backbone for kind {cls.kind!r}"
        if cfg.k < 1 + len(cfg.member_backbones):
            return (f"{key}.k must be at least 1 + len({key}.member_backbones) = {1 + len(cfg.member_backbones)} "
                    f"for kind {cls.kind!r} (one member per backbone), got {cfg.k}")
        return None

    def _blocks(self) -> list[int]:
        return member_blocks(self.k, 1 + len(self.cfg.member_backbones))

    # Its frozen blocks' heads read other features than the reward backbone's.
    head_inputs = RewardEnsemble.head_inputs

    def init_from_backbone(self) -> None:
        first, *rest = self._blocks()
        self.model = load_reward_model(self.backbone_cfg, num_labels=first)
        _seed_member_heads(_classifier(self.model), self.seed)
        self.reward_tokenizer = load_tokenizer(self.backbone_cfg)
        blocks, offset = [], first
        for cfg, k in zip(self.cfg.member_backbones, rest, strict=True):
            block = _FrozenBackboneBlock(load_backbone(cfg), load_tokenizer(cfg), k)
            _seed_member_heads(block.heads, self.seed, first=offset)
            blocks.append(block)
            offset += k
        self.frozen_blocks = nn.ModuleList(blocks)

    def members_forward(self, input_ids, attention_mask, token_type_ids=None):
        own = super().members_forward(input_ids, attention_mask, token_type_ids)
        texts = self.reward_tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.cat([own, *(block(texts) for block in self.frozen_blocks)], 1)

    def _frozen_heads(self) -> list[nn.Parameter]:
        return [p for block in self.frozen_blocks for p in block.heads.parameters()]

    def phases(self) -> list[Phase]:
        def prepare() -> list[dict]:
            heads = self._frozen_heads()
            for p in heads:
                p.requires_grad_(True)
            return [*_unfreeze_whole_model(self.model, self.lr, self.head_lr), {"params": heads, "lr": self.head_lr}]

        return [Phase("joint", "all", False, self._member_loss, prepare)]

    def member_parameter_count(self) -> int:
        return super().member_parameter_count() + sum(p.numel() for p in self._frozen_heads())

    def refinable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return super().refinable_parameters() + [
            (f"frozen_blocks.{i}.heads.{name}", p)
            for i, block in enumerate(self.frozen_blocks)
            for name, p in block.heads.named_parameters()
        ]

    def save_weights(self, path: Path) -> None:
        super().save_weights(path)
        self.reward_tokenizer.save_pretrained(path / "model")
        for i, block in enumerate(self.frozen_blocks):
            block.save(path / f"member_backbone_{i + 1}")

    def load_weights(self, path: Path) -> None:
        super().load_weights(path)
        self.reward_tokenizer = AutoTokenizer.from_pretrained(path / "model")
        self.frozen_blocks = nn.ModuleList(
            _FrozenBackboneBlock.load(path / f"member_backbone_{i + 1}", k, trust_remote_code=cfg.trust_remote_code)
            for i, (cfg, k) in enumerate(zip(self.cfg.member_backbones, self._blocks()[1:], strict=True))
        )
