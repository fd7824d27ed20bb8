"""Configs of reward modelling (``jobs.train_reward``): the ensemble shape and its training.

One ``EnsembleConfig`` is shared by every kind rather than one config type per kind:
``TrainRewardConfig.kinds`` trains several kinds with the same shape (same K, same
LoRA settings) so that they compare like for like, and a kind ignores the fields
that do not concern it (each field says which kinds read it). K is one of them:
kind ``single`` is one reward model whatever ``k`` says (``EnsembleConfig.for_kind``),
while an ensemble built directly must match its kind (``k_problem``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from uprlhf.registry import RegistryNames, registry_name
from uprlhf.section import ModelConfig, Section

# An ensemble kind by name: an entry of ``uprlhf.reward.ensembles.ENSEMBLES``.
EnsembleKind = registry_name("uprlhf.reward.ensembles:ENSEMBLES")
# Every registered kind, in registration order (read from the registry when first used).
ENSEMBLE_KINDS = RegistryNames("uprlhf.reward.ensembles:ENSEMBLES")


def fixed_k(kind: str) -> int | None:
    """The K that ``kind`` always has (``single``: 1); None for the ensemble kinds, which take ``k``."""
    from uprlhf.reward.ensembles import ensemble_class

    return ensemble_class(kind).fixed_k


def prior_problem(kind: str, prior_scale: float, key: str = "ensemble.prior_scale") -> str | None:
    """One line when ``kind`` cannot take randomized priors, else None.

    A prior is fitted away only where each member's own loss pins its reward; a kind that
    trains the members' mean as one predictor (``diverse_lora``) would keep β·p_k's spread
    everywhere, on the pairs as well.
    """
    from uprlhf.reward.ensembles import ensemble_class

    if prior_scale > 0 and not ensemble_class(kind).fits_each_member:
        return f"{key} must be 0 for kind {kind!r}: it trains the members' mean, so nothing fits each member's prior away"
    return None


def shape_problem(kind: str, cfg: EnsembleConfig, key: str = "ensemble") -> str | None:
    """One line when ``kind`` cannot be built in the shape ``cfg`` beyond K and priors (the kind's own rule), else None."""
    from uprlhf.reward.ensembles import ensemble_class

    return ensemble_class(kind).shape_problem(cfg, key)


def default_kinds() -> list[str]:
    """Every registered kind that the default ensemble shape can build (all but those that need more settings)."""
    return [kind for kind in ENSEMBLE_KINDS if shape_problem(kind, EnsembleConfig()) is None]


def k_problem(kind: str, k: int, key: str = "ensemble.k") -> str | None:
    """One line when an ensemble of ``kind`` cannot have ``k`` members (``key`` names the config field), else None."""
    fixed = fixed_k(kind)
    if fixed is not None and k != fixed:
        return f"{key} must be {fixed} for kind {kind!r}, got {k}"
    if fixed is None and k < 2:
        return f"{key} must be >= 2 for kind {kind!r} (an ensemble; one model is kind 'single'), got {k}"
    return None


class EnsembleConfig(Section):
    k: int = Field(
        5,
        ge=1,
        le=64,
        description="Number of ensemble members K (>= 2; multi_backbone: at least one per backbone); kind 'single' is "
        "one model (K = 1) whatever this says.",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank r of each member (LoRA kinds).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        description="Names of the linear modules that get LoRA adapters.",
    )
    lora_top_layers: int | None = Field(
        None,
        ge=1,
        description="Put LoRA only on the top N transformer layers, so the frozen lower "
        "layers run once for all members when scoring; null = every layer.",
    )
    nnm_lambda: float = Field(
        0.1, ge=0, description="Weight of the nuclear-norm diversity term (diverse_lora)."
    )
    lora_init: Literal["kaiming", "gaussian"] = Field(
        "kaiming",
        description="Initialisation of each member's LoRA A (B starts at 0 either way; LoRA kinds): 'kaiming' is "
        "peft's default (Kaiming-uniform), 'gaussian' draws A from N(0, (1/r)^2), the Gaussian A of UP-RLHF (paper 000).",
    )
    warmup_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of the training pairs on which the LoRA kinds first train the shared backbone with K "
        "linear heads (a linear-layer ensemble); their members, member k from head k, train on the rest. "
        "Half, as efficient reward-model ensembles (paper 001, Algorithm 1 line 14 and §4) warm up on one "
        "preference set and train the members on a second of about the same size.",
    )
    bootstrap: bool = Field(
        False, description="Train each independent member on a bootstrap resample of the pairs."
    )
    reward_centering: float = Field(
        0.0,
        ge=0,
        description="η of the reward-centring term η·mean((r⁺ + r⁻)²) added to every kind's Bradley–Terry loss "
        "(Eisenstein et al. 2023): BT fits only each pair's difference, this pins each member's level on the pairs "
        "too, so what the pairs share (a prompt, a random prior's offset) is not left free. 0: off.",
    )
    member_backbones: list[ModelConfig] = Field(
        default_factory=list,
        description="Further pretrained backbones for kind multi_backbone (Eisenstein et al. 2023: members that "
        "differ in pretraining share fewer errors than members that differ only in fine-tuning). The K members are "
        "dealt in contiguous blocks over [the reward backbone, *these]: the reward backbone's block is fine-tuned "
        "with its heads as kind linear; each further backbone stays frozen under linear heads of its own over its "
        "mean-pooled and last-token features, and reads the text re-encoded with its own tokenizer. Other kinds ignore it.",
    )
    prior_scale: float = Field(
        0.0,
        ge=0,
        description="β of randomized prior functions (Osband et al. 2018; uprlhf.reward.priors), any kind: member "
        "k's reward is f_k(x) + β·p_k(x), p_k a fixed random network of the tokens seeded per member and never "
        "trained, so members agree where the pairs pin f_k down and keep their priors' disagreement elsewhere. "
        "0: no prior.",
    )

    def for_kind(self, kind: str) -> EnsembleConfig:
        """The shape ``kind`` is built with from this shared one: its own K where the kind fixes one."""
        fixed = fixed_k(kind)
        return self if fixed is None or fixed == self.k else self.replace(k=fixed)


class TrainConfig(Section):
    epochs: int = Field(1, ge=1, description="Passes over the training pairs (per phase).")
    batch_size: int = Field(16, ge=1, description="Pairs per step on each worker.")
    lr: float = Field(5e-5, gt=0, description="Learning rate of backbone weights.")
    head_lr: float = Field(1e-3, gt=0, description="Learning rate of reward heads and LoRA weights.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(96, ge=8, description="Tokens per (prompt, response) after truncation.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DeepSpeed data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each worker.")
    use_gpu: bool = Field(False, description="Train on GPUs (NCCL) instead of CPUs (gloo).")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    checkpoints: int = Field(
        2,
        ge=1,
        description="Checkpoints saved per kind, evenly spaced over the last training phase, "
        "each with its mean learning rate and (ZeRO stage 0, where the optimiser keeps "
        "per-parameter state) its Adam moments; the selector's influence step reads them.",
    )
    max_pairs: int | None = Field(
        None,
        ge=2,
        description="Train on this many of the training pairs, a draw seeded by `seed` and nested (a smaller budget "
        "keeps a subset of a larger one's), so one data build serves a data-budget ablation; None: every pair. "
        "More than the file holds is refused.",
    )
    seed: int = Field(0, description="Seed of initialisation, shuffling and bootstrap draws.")


class TrainRewardConfig(Section):
    data_dir: str | None = Field(
        None,
        description="Folder written by jobs.prepare_data (reward_train, reward_test, ood: each a "
        ".parquet, .jsonl, .json or .csv file or a saved datasets folder); default: OUTPUT_DIR/data.",
    )
    backbone: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:minilm"),
        description="Encoder (or decoder) under the reward heads.",
    )
    kinds: list[EnsembleKind] = Field(
        default_factory=default_kinds,
        min_length=1,
        description="Ensemble kinds to train and compare, all with the one shape of `ensemble`; default every "
        "kind of the uprlhf.reward.ensembles registry that needs no further setting (not multi_backbone, which "
        "needs ensemble.member_backbones).",
    )
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="Ensemble shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    max_chars: int = Field(4000, ge=1, description="Longest text accepted in the data files.")
    skip_bad_rows: bool = Field(
        False, description="Drop invalid data rows (counted in summary.json) instead of failing."
    )

    @model_validator(mode="after")
    def _k_fits_kinds(self) -> TrainRewardConfig:
        for kind in self.kinds:
            problem = (
                k_problem(kind, self.ensemble_for(kind).k)
                or prior_problem(kind, self.ensemble.prior_scale)
                or shape_problem(kind, self.ensemble_for(kind))
            )
            if problem:
                raise ValueError(problem)
        return self

    def ensemble_for(self, kind: str) -> EnsembleConfig:
        """The ensemble shape ``kind`` trains with (``single``: K = 1)."""
        return self.ensemble.for_kind(kind)
