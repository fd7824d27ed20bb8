"""A study's config: arms × seeds of one PPO setup, the shared work they start from, and the claims it tests."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from uprlhf.data.config import PrepareDataConfig
from uprlhf.reward.config import TrainRewardConfig
from uprlhf.rl.config import RLConfig
from uprlhf.section import Section

# The per-cell figures a study aggregates (each cell's summary.json, or computed from its records).
STUDY_METRICS = (
    "gold_final", "gold_best", "gold_at_matched_kl", "gold_var_final", "win_rate", "kl_final", "proxy_final",
    "uncertainty_mean",
)


class ClaimConfig(Section):
    """One claim of a paper, decided by the 95 % interval of a paired difference over seeds."""

    text: str = Field(description="What the paper reports, in a line (e.g. 'UP-RLHF keeps gold higher at matched KL').")
    paper: str = Field("", description="Where it is reported, e.g. '000 Figs. 4-5'.")
    metric: Literal[STUDY_METRICS] = Field(description="The figure compared (one of STUDY_METRICS).")  # type: ignore[valid-type]
    arm: str = Field(description="The arm the claim is about.")
    direction: Literal["higher", "lower"] = Field(
        "higher", description="The claim holds when the arm's figure is higher (lower) than the baseline's, paired by seed."
    )


class StudyConfig(Section):
    """``python -m jobs.study``: every (arm, seed) cell as one PPO run, shared data and ensembles built once."""

    data: PrepareDataConfig | None = Field(
        None, description="Step 1 data, built once into OUTPUT_DIR/data; null when rl.prompts or rl.data_dir names data."
    )
    reward: TrainRewardConfig | None = Field(
        None,
        description="The ensemble training, run once per distinct set of the arms' reward.* overrides into "
        "OUTPUT_DIR/reward/<variant>; null when rl.reward_checkpoint names a trained ensemble.",
    )
    rl: RLConfig = Field(default_factory=RLConfig, description="The PPO run every cell starts from.")
    arms: dict[str, list[str]] = Field(
        min_length=1,
        description="Arm name → dotted overrides under rl. or reward., e.g. up_rlhf: ['rl.penalty.name=up_rlhf', "
        "'rl.penalty.coefficients={beta: 1.0}']; an arm with no overrides is the base run.",
    )
    baseline: str = Field(description="The arm every difference and win rate is taken against.")
    seeds: list[int] = Field(min_length=2, description="Seeds of every arm (rl.seed); differences are paired by seed.")
    claims: list[ClaimConfig] = Field(default_factory=list, description="The claims the study decides.")
    driver_cpus: float = Field(0.25, gt=0, description="CPUs of each cell's driver, beside its placement plan.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Cells at once; null: as many as the cluster's CPUs and GPUs hold."
    )

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if self.baseline not in self.arms:
            raise ValueError(f"baseline={self.baseline!r} is not an arm; arms: {', '.join(map(repr, self.arms))}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed: differences are paired by seed")
        for claim in self.claims:
            if claim.arm not in self.arms or claim.arm == self.baseline:
                raise ValueError(f"claim {claim.text!r}: arm={claim.arm!r} must be an arm other than the baseline "
                                 f"{self.baseline!r}; arms: {', '.join(map(repr, self.arms))}")
        for name, overrides in self.arms.items():
            for override in overrides:
                key = override.partition("=")[0].strip()
                section = key.partition(".")[0]
                if "=" not in override or section not in ("rl", "reward") or "." not in key:
                    raise ValueError(f"arms.{name}: {override!r} must be rl.PATH=VALUE or reward.PATH=VALUE")
                if section == "reward" and self.reward is None:
                    raise ValueError(f"arms.{name}: {override!r} overrides the ensemble training, but reward is null")
        if self.reward is None and self.rl.reward_checkpoint is None:
            raise ValueError("no ensemble: set reward (trained once per variant) or rl.reward_checkpoint")
        return self
