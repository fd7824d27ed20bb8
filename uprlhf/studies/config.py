"""A study's config: arms × seeds of one job (PPO, ensemble training, best-of-n or paper 002's bandit), the shared
work they start from, and the claims it tests."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from uprlhf.data.config import PrepareDataConfig
from uprlhf.reward.config import TrainRewardConfig
from uprlhf.rl.config import BestOfNConfig, RLConfig
from uprlhf.rl.gold_metrics import UNCERTAINTY_DIAGNOSTICS
from uprlhf.section import Section
from uprlhf.studies.bandit import POLICIES, BanditConfig

# The per-cell figures a study aggregates, per job (each cell's summary.json, or computed from its records).
STUDY_METRICS = (
    "gold_final", "gold_best", "gold_at_matched_kl", "gold_var_final", "win_rate", "kl_final", "proxy_final",
    "uncertainty_mean", "u_kl_spearman", *UNCERTAINTY_DIAGNOSTICS,
)
REWARD_METRICS = (
    "accuracy", "ece", "ood_auroc", "diversity", "normalised_accuracy", "normalised_ece", "normalised_ood_auroc",
)
BANDIT_METRICS = ("return_mean", "return_std", "p_below_reference")
BEST_OF_N_FIGURES = ("gold", "proxy", "uncertainty")  # per n: gold_n16, proxy_n16, ...
# What a cell runs → the config sections its arms may override.
CELL_JOBS = {"ppo": ("rl", "reward"), "reward": ("reward",), "best_of_n": ("best_of_n", "reward"), "bandit": ("bandit",)}


def judge_metrics(judges: list[str]) -> tuple[str, ...]:
    """A PPO cell's further figures: the final evaluation's score by each of rl.judges."""
    return tuple(f"judge_{name}_final" for name in judges)


def best_of_n_metrics(ns: list[int]) -> tuple[str, ...]:
    """A best-of-n cell's figures: the ranked response's gold, proxy and u at each n."""
    return tuple(f"{figure}_n{n}" for n in ns for figure in BEST_OF_N_FIGURES)


class BanditStudyConfig(BanditConfig):
    """One cell of paper 002's bandit simulation (``uprlhf.studies.bandit``): a setting and the policy whose return counts."""

    policy: Literal[POLICIES] = Field("vanilla", description="The policy whose true return is the cell's figure: vanilla or variance_aware.")  # type: ignore[valid-type]


class ClaimConfig(Section):
    """One claim of a paper, decided by a 95 % interval over seeds: of the differences paired by seed, or of a variance ratio."""

    text: str = Field(description="What the paper reports, in a line (e.g. 'UP-RLHF keeps gold higher at matched KL').")
    paper: str = Field("", description="Where it is reported, e.g. '000 Figs. 4-5'.")
    metric: str = Field(description="The figure compared: one of the study job's figures (StudyConfig.metrics).")
    arm: str = Field(description="The arm the claim is about.")
    against: str | None = Field(None, description="The arm it is compared with, paired by seed; default the study's baseline.")
    direction: Literal["higher", "lower"] = Field(
        "higher", description="The claim holds when the arm's figure (or its spread, for compare: spread) is higher "
        "(lower) than the other arm's."
    )
    compare: Literal["mean", "spread"] = Field(
        "mean", description="mean: the arm's figure against the other arm's, as differences paired by seed; spread: the "
        "std of the figure over the arm's seeds against the other arm's, as a variance ratio with its F interval "
        "(paper 002 Fig. 7: the spread of gold across policies)."
    )


class StudyConfig(Section):
    """``python -m jobs.study``: every (arm, seed) cell as one run of ``job``, shared data and ensembles built once."""

    job: Literal[tuple(CELL_JOBS)] = Field(  # type: ignore[valid-type]
        "ppo",
        description="What a cell runs: ppo (a PPO run of rl), reward (one ensemble kind trained from reward, seed = "
        "reward.train.seed), best_of_n (best-of-n of best_of_n, seed = its sampling seed) or bandit (paper 002's simulation).",
    )

    data: PrepareDataConfig | None = Field(
        None, description="Step 1 data, built once into OUTPUT_DIR/data; null when rl.prompts or rl.data_dir names data."
    )
    reward: TrainRewardConfig | None = Field(
        None,
        description="The ensemble training, run once per distinct set of the arms' reward.* overrides into "
        "OUTPUT_DIR/reward/<variant>; null when rl.reward_checkpoint names a trained ensemble.",
    )
    rl: RLConfig = Field(default_factory=RLConfig, description="job ppo: the PPO run every cell starts from.")
    best_of_n: BestOfNConfig | None = Field(None, description="job best_of_n: the best-of-n run every cell starts from.")
    bandit: BanditStudyConfig = Field(default_factory=BanditStudyConfig, description="job bandit: the simulation every cell starts from.")
    arms: dict[str, list[str]] = Field(
        min_length=1,
        description="Arm name → dotted overrides under the sections the job reads (ppo: rl., reward.; reward: reward.; "
        "best_of_n: best_of_n., reward.; bandit: bandit.), e.g. up_rlhf: ['rl.penalty.name=up_rlhf', "
        "'rl.penalty.coefficients={beta: 1.0}']; an arm with no overrides is the base run.",
    )
    baseline: str = Field(description="The arm every difference and win rate is taken against.")
    seeds: list[int] = Field(min_length=2, description="Seeds of every arm (the job's seed); differences are paired by seed.")
    claims: list[ClaimConfig] = Field(default_factory=list, description="The claims the study decides.")
    seed_fields: list[str] = Field(
        default_factory=list,
        description="Dotted paths of the cell's own section (rl. or best_of_n.) that every cell sets to its seed, beside "
        "the job's seed, e.g. [rl.penalty.member]: paper 002 trains one policy per ensemble member, seed i against member i.",
    )
    driver_cpus: float = Field(0.25, gt=0, description="CPUs of each cell's driver, beside its placement plan.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Cells at once; null: as many as the cluster's CPUs and GPUs hold."
    )

    @property
    def metrics(self) -> tuple[str, ...]:
        """The figures every cell of this study's job reports."""
        if self.job == "best_of_n":
            return best_of_n_metrics(self.best_of_n.n) if self.best_of_n else ()
        return {"ppo": STUDY_METRICS + judge_metrics(self.rl.judges), "reward": REWARD_METRICS,
                "bandit": BANDIT_METRICS}[self.job]

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if self.baseline not in self.arms:
            raise ValueError(f"baseline={self.baseline!r} is not an arm; arms: {', '.join(map(repr, self.arms))}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed: differences are paired by seed")
        if self.job == "best_of_n" and self.best_of_n is None:
            raise ValueError("job best_of_n needs a best_of_n section: the best-of-n run every cell starts from")
        for i, claim in enumerate(self.claims):
            against = claim.against or self.baseline
            if claim.arm not in self.arms or claim.arm == against or against not in self.arms:
                raise ValueError(f"claim {claim.text!r}: arm={claim.arm!r} must be an arm other than the one it is "
                                 f"compared with ({against!r}); arms: {', '.join(map(repr, self.arms))}")
            if claim.metric not in self.metrics:
                raise ValueError(f"claims.{i}.metric = {claim.metric!r}: not a figure of a {self.job} study; "
                                 f"allowed: {', '.join(self.metrics)}")
        sections = CELL_JOBS[self.job]
        for name, overrides in self.arms.items():
            for override in overrides:
                key = override.partition("=")[0].strip()
                section = key.partition(".")[0]
                if "=" not in override or section not in sections or "." not in key:
                    allowed = " or ".join(f"{s}.PATH=VALUE" for s in sections)
                    raise ValueError(f"arms.{name}: {override!r} must be {allowed} (job {self.job})")
                if section == "reward" and self.reward is None:
                    raise ValueError(f"arms.{name}: {override!r} overrides the ensemble training, but reward is null")
        cell_section = CELL_JOBS[self.job][0]
        for path in self.seed_fields:
            if self.job not in ("ppo", "best_of_n"):
                raise ValueError(f"seed_fields: a {self.job} cell has no field to set besides its seed; drop {path!r}")
            section, _, rest = path.partition(".")
            if section != cell_section or not rest or "" in rest.split("."):
                raise ValueError(f"seed_fields: {path!r} must be a dotted path under {cell_section}. (job {self.job})")
            for name, overrides in self.arms.items():
                if any(o.partition("=")[0].strip() == path for o in overrides):
                    raise ValueError(f"arms.{name}: {path} is a seed field (set to each cell's seed); it cannot be overridden")
        checkpoint = {"ppo": self.rl.reward_checkpoint, "best_of_n": self.best_of_n and self.best_of_n.reward_checkpoint}
        if self.job in checkpoint and self.reward is None and checkpoint[self.job] is None:
            raise ValueError(f"no ensemble: set reward (trained once per variant) or {self.job.replace('ppo', 'rl')}.reward_checkpoint")
        if self.job == "reward" and self.reward is None:
            raise ValueError("job reward needs a reward section: the ensemble training every cell starts from")
        return self
