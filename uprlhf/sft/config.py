"""Config of supervised fine-tuning (``jobs.sft``): the policy, its data and the DeepSpeed learner group.

The policy and learner sections are the RL job's own types, so an SFT config reads like
the PPO config it feeds: the same model, LoRA settings and prompt template, the same
learner ranks.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from uprlhf.rl.config import LearnerConfig, PolicyConfig
from uprlhf.section import Section


class SFTConfig(Section):
    data_dir: str | None = Field(
        None,
        description="Folder written by jobs.prepare_data with data.sft_completions_per_prompt >= 1 (its sft file: "
        "the gold-best completion per SFT prompt); default: OUTPUT_DIR/data.",
    )
    data_file: str | None = Field(
        None,
        description="Any prompt/response data instead (.parquet, .jsonl, .json, .csv or a saved datasets folder with "
        "'prompt' and 'response' columns); overrides data_dir.",
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig,
        description="Model to fine-tune: LoRA (policy.lora_rank) or every weight (lora_rank null); the prompt template "
        "wraps each prompt as the RL rollouts will.",
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="DeepSpeed data-parallel ranks.")
    epochs: int = Field(3, ge=1, description="Passes over the data.")
    batch_size: int = Field(8, ge=1, description="Examples per optimiser step over all ranks (a multiple of learner.num_workers).")
    lr: float = Field(
        1e-3, gt=0, description="Peak learning rate, decaying linearly to a tenth over the run; 1e-3 suits the default "
        "LoRA (measured on the embedded task, README), every weight wants far less (1e-5 to 1e-4).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(128, ge=8, description="Tokens of prompt + response; a longer response is cut at the end.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of the examples held out (seeded) for the response-token loss before and after training.",
    )
    checkpoint_every: int = Field(20, ge=1, description="Optimiser steps between resume checkpoints (and after the last).")
    max_chars: int = Field(4000, ge=1, description="Longest prompt or response accepted, in characters.")
    skip_bad_rows: bool = Field(False, description="Drop (and count) bad rows instead of failing on the first load.")
    seed: int = Field(0, description="Seed of initialisation and data order.")

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.batch_size % self.learner.num_workers:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of learner.num_workers={self.learner.num_workers} "
                "(each rank takes an equal share of a step)"
            )
        return self
