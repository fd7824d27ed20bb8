"""The sweep's typed config: a base PPO run, where its data and ensemble come from, the
search space, the search algorithm, ASHA and the trial resources.

Validated before Ray starts, like every job's config: an unknown parameter, a value
the PPO config rejects, a coefficient that a penalty in the sweep does not take, or a
search algorithm that is not installed is reported as one line naming the field.
"""

from __future__ import annotations

import importlib.util
import itertools
from typing import Any, Literal

from pydantic import Field, model_validator

from uprlhf.config import (
    ConfigError,
    PenaltyConfig,
    PipelineConfig,
    PrepareDataConfig,
    RLConfig,
    Section,
    TrainRewardConfig,
    build,
    load_config,
    set_dotted,
)

# Short names of the parameters the methods are tuned by (DESIGN §1). Any other key is a
# dotted path under ``rl.`` (the PPO run) or ``reward.`` (the ensemble).
ALIASES = {
    "penalty": "rl.penalty",  # whole penalty configs {name, coefficients}
    "beta_kl": "rl.kl.coef",  # β of the KL to the reference (β₁ of UP-RLHF)
    "beta_unc": "rl.penalty.coefficients.beta",  # β₂ of up_rlhf, β of var_kl
    "lam": "rl.penalty.coefficients.lam",  # λ of lcb and uwo
    "nnm_lambda": "reward.ensemble.nnm_lambda",  # diversity weight of diverse_lora
    "seed": "rl.seed",
}
SECTIONS = ("rl", "reward")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
ALGORITHMS = ("grid", "random", "optuna")
SEARCH_PACKAGES = {"optuna": "optuna"}  # algorithm → the package it needs beyond Ray Tune


def target(key: str) -> str:
    """The dotted path a space key sets: an alias's path, or the key itself."""
    return ALIASES.get(key, key)


class Param(Section):
    """One swept parameter: exactly one distribution."""

    grid: list[Any] | None = Field(None, description="Every value is tried, crossed with every other grid parameter.")
    choice: list[Any] | None = Field(None, description="One value drawn per trial (random search, optuna).")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float drawn uniformly (random search, optuna).")
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high], low > 0: drawn uniformly in log space, for strengths that span decades."
    )
    randint: tuple[int, int] | None = Field(None, description="[low, high): an integer drawn uniformly, e.g. seeds.")

    @model_validator(mode="after")
    def _one(self) -> Param:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        if self.values is not None and not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        if self.values is None and not self.spec[0] < self.spec[1]:
            raise ValueError(f"{self.kind} bounds {list(self.spec)} need low < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform bounds {list(self.loguniform)} need low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)

    @property
    def values(self) -> list | None:
        """The finite set a grid or choice takes; None for a continuous range."""
        return self.grid if self.grid is not None else self.choice

    def probes(self) -> list:
        """Values that validate the whole range: every listed value, or both bounds."""
        if self.values is not None:
            return list(self.values)
        low, high = self.spec
        return [low, high - 1] if self.kind == "randint" else [low, high]


class SearchConfig(Section):
    algorithm: Literal["grid", "random", "optuna"] = Field(
        "grid",
        description="grid: every combination of the grid values; random: num_samples draws from the "
        "distributions (grid values still crossed); optuna: TPE over the distributions (needs the optuna package).",
    )
    num_samples: int = Field(1, ge=1, description="grid: repeats of the whole grid; random, optuna: trials drawn.")
    seed: int = Field(0, description="Seed of the search algorithm's draws.")


class ASHAConfig(Section):
    """Asynchronous successive halving on the gold reward (higher is better), up to rl.ppo.steps."""

    enabled: bool = Field(True, description="Stop the weaker trials early; off runs every trial to rl.ppo.steps.")
    metric: Literal["gold", "gold_train"] = Field(
        "gold",
        description="gold: the latest held-out gold evaluation (every rl.gold_every steps, carried forward); "
        "gold_train: the gold reward of the step's own samples (noisier).",
    )
    grace_period: int = Field(
        4, ge=1, description="PPO steps every trial runs before it can be stopped; best a multiple of rl.gold_every."
    )
    reduction_factor: float = Field(2.0, gt=1, description="At each rung only the best 1/reduction_factor of trials go on.")


class TrialResourcesConfig(Section):
    driver_cpus: float = Field(
        0.25, ge=0, description="CPUs each trial's driver (the PPO loop, gold scoring) reserves beside its actors' bundles."
    )
    max_concurrent: int | None = Field(
        None,
        ge=1,
        description="Trials running at once; null: as many as the cluster holds by CPUs and GPUs per trial "
        "(set it on an autoscaling cluster, whose resources grow only once trials are waiting).",
    )


class SweepConfig(Section):
    base: str | None = Field(
        None,
        description="A jobs.pipeline YAML whose data, reward and rl.base sections become this sweep's defaults; "
        "the sweep's own sections override them field by field.",
    )
    data: PrepareDataConfig | None = Field(
        None, description="Step 1 data, built once into OUTPUT_DIR/data; null when rl.prompts or rl.data_dir names data."
    )
    reward: TrainRewardConfig | None = Field(
        None,
        description="The ensemble, trained once (of kind rl.reward_kind) into OUTPUT_DIR/reward/shared, or once per "
        "combination of swept ensemble parameters; null when rl.reward_checkpoint names a trained one.",
    )
    rl: RLConfig = Field(default_factory=RLConfig, description="The PPO run every trial starts from.")
    space: dict[str, Param] = Field(
        min_length=1,
        description=f"Swept parameters: an alias ({', '.join(ALIASES)}) or a dotted path under rl. or reward., "
        "each with one distribution, e.g. beta_kl: {grid: [0.02, 0.1]}. `penalty` takes whole penalty configs.",
    )
    search: SearchConfig = Field(default_factory=SearchConfig, description="How trials are drawn from the space.")
    asha: ASHAConfig = Field(default_factory=ASHAConfig, description="Early stopping.")
    resources: TrialResourcesConfig = Field(default_factory=TrialResourcesConfig, description="What each trial reserves.")

    @model_validator(mode="before")
    @classmethod
    def _merge_base(cls, tree: Any) -> Any:
        if not isinstance(tree, dict) or not tree.get("base"):
            return tree
        try:
            pipeline = load_config(PipelineConfig, tree["base"]).model_dump(mode="json")
        except ConfigError as err:
            raise ValueError(f"base: {err}") from None
        return merge({"data": pipeline["data"], "reward": pipeline["reward"], "rl": pipeline["rl"]["base"]}, tree)

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        for key, param in self.space.items():
            self._check_param(key, param)
        self._check_search()
        if self.reward is None and self.rl.reward_checkpoint is None:
            raise ValueError("no ensemble: set reward (trained once for the sweep) or rl.reward_checkpoint")
        if self.reward is not None and self.rl.reward_checkpoint is not None:
            raise ValueError("both reward and rl.reward_checkpoint are set: keep one (reward=null reuses the checkpoint)")
        if self.needs_data and self.data is None:
            raise ValueError("no data: set data (built into OUTPUT_DIR/data), or rl.prompts / rl.data_dir and reward.data_dir")
        if self.asha.enabled and self.asha.grace_period >= self.rl.ppo.steps:
            raise ValueError(f"asha.grace_period={self.asha.grace_period} must be below rl.ppo.steps={self.rl.ppo.steps}")
        return self

    def _check_param(self, key: str, param: Param) -> None:
        path = target(key)
        section, _, rest = path.partition(".")
        if section not in SECTIONS or not rest:
            raise ValueError(f"space.{key}: unknown parameter; use one of {', '.join(ALIASES)} or a dotted path under rl. or reward.")
        if path == ALIASES["penalty"]:
            if param.values is None:
                raise ValueError(f"space.{key}: penalties are whole configs; list them with grid or choice")
            for value in param.values:
                PenaltyConfig.model_validate(value)
        elif section == "reward":
            self._check_ensemble_param(key, param, rest)
        else:
            penalties = self.penalties()
            for value, penalty in itertools.product(param.probes(), penalties):
                tree = self.rl.model_dump(mode="json")
                tree["penalty"] = penalty.model_dump()
                set_dotted(tree, rest, value)
                try:
                    build(RLConfig, tree, f"space.{key}={value!r}")
                except ConfigError as err:
                    raise ValueError(str(err)) from None

    def _check_ensemble_param(self, key: str, param: Param, path: str) -> None:
        if self.reward is None:
            raise ValueError(f"space.{key} is an ensemble parameter: set reward so that ensembles are trained per value")
        if param.values is None:
            raise ValueError(f"space.{key} is an ensemble parameter, trained before the trials: list its values with grid or choice")
        if path == "ensemble.nnm_lambda" and self.rl.reward_kind != "diverse_lora":
            raise ValueError(f"space.{key}: nnm_lambda only shapes diverse_lora ensembles, but rl.reward_kind={self.rl.reward_kind!r}")
        for value in param.values:
            tree = self.reward.model_dump(mode="json")
            set_dotted(tree, path, value)
            try:
                build(TrainRewardConfig, tree, f"space.{key}={value!r}")
            except ConfigError as err:
                raise ValueError(str(err)) from None

    def _check_search(self) -> None:
        algorithm = self.search.algorithm
        package = SEARCH_PACKAGES.get(algorithm)
        if package and importlib.util.find_spec(package) is None:
            other = [a for a in ALGORITHMS if a not in SEARCH_PACKAGES]
            raise ValueError(f"search.algorithm={algorithm} needs the {package} package (pip install {package}); without it: {', '.join(other)}")
        kinds = {key: param.kind for key, param in self.space.items()}
        if algorithm == "grid" and any(kind != "grid" for kind in kinds.values()):
            raise ValueError(f"search.algorithm=grid takes grid values only, got {kinds}; use search.algorithm=random to draw")
        if algorithm == "optuna" and "grid" in kinds.values():
            raise ValueError(f"search.algorithm=optuna draws every parameter; use choice instead of grid, got {kinds}")

    def penalties(self) -> list[PenaltyConfig]:
        """Every penalty a trial can have: the swept ones, or the base run's."""
        swept = [p for key, p in self.space.items() if target(key) == ALIASES["penalty"]]
        return [PenaltyConfig.model_validate(v) for v in swept[0].values] if swept else [self.rl.penalty]

    def ensemble_params(self) -> dict[str, Param]:
        """Swept parameters of the ensemble (path under reward. → its distribution)."""
        return {target(k).partition(".")[2]: p for k, p in self.space.items() if target(k).startswith("reward.")}

    @property
    def needs_data(self) -> bool:
        """Whether the sweep builds Step 1 data: the PPO prompts or the ensemble's pairs name none."""
        rl_has = self.rl.prompts is not None or self.rl.data_dir is not None
        reward_has = self.reward is None or self.reward.data_dir is not None
        return not (rl_has and reward_has)


def merge(defaults: dict, tree: dict) -> dict:
    """``tree`` over ``defaults``, nested mappings merged key by key."""
    merged = dict(defaults)
    for key, value in tree.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
