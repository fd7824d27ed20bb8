"""Configs of reward modelling (``jobs.train_reward``): the ensemble shape and its training.

One ``EnsembleConfig`` is shared by every kind rather than one config type per kind:
``TrainRewardConfig.kinds`` trains several kinds with the same shape (same K, same
LoRA settings) so that they compare like for like, and a kind ignores the fields
that do not concern it (each field says which kinds read it).
"""

from __future__ import annotations

from pydantic import Field

from uprlhf.registry import RegistryNames, registry_name
from uprlhf.section import ModelConfig, Section

# An ensemble kind by name: an entry of ``uprlhf.reward.ensembles.ENSEMBLES``.
EnsembleKind = registry_name("uprlhf.reward.ensembles:ENSEMBLES")
# Every registered kind, in registration order (read from the registry when first used).
ENSEMBLE_KINDS = RegistryNames("uprlhf.reward.ensembles:ENSEMBLES")


class EnsembleConfig(Section):
    k: int = Field(5, ge=2, le=64, description="Number of ensemble members K.")
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
    warmup_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Share of the training pairs used to warm up the shared backbone of the "
        "LoRA kinds; their members train on the rest.",
    )
    bootstrap: bool = Field(
        False, description="Train each independent member on a bootstrap resample of the pairs."
    )


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
        default_factory=lambda: list(ENSEMBLE_KINDS),
        min_length=1,
        description="Ensemble kinds to train and compare, all with the one shape of `ensemble`; "
        "default every kind of the uprlhf.reward.ensembles registry.",
    )
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="Ensemble shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    max_chars: int = Field(4000, ge=1, description="Longest text accepted in the data files.")
    skip_bad_rows: bool = Field(
        False, description="Drop invalid data rows (counted in summary.json) instead of failing."
    )
