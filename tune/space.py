"""From the sweep config to Tune and back: the param space, the search algorithm, the
ensembles to train before the trials, and each trial's PPO config."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune as ray_tune
from tune.config import ALIASES, SweepConfig, target
from uprlhf.config import PenaltyConfig, RLConfig, TrainRewardConfig, build, set_dotted


# Param kind (tune.config.DISTRIBUTIONS) → the Tune domain it becomes.
DOMAINS: dict[str, Callable[[Any], Any]] = {
    "grid": lambda spec: ray_tune.grid_search(list(spec)),
    "choice": lambda spec: ray_tune.choice(list(spec)),
    "uniform": lambda spec: ray_tune.uniform(*spec),
    "loguniform": lambda spec: ray_tune.loguniform(*spec),
    "randint": lambda spec: ray_tune.randint(*spec),
}


def _variants(cfg: SweepConfig, max_concurrent: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.search.seed)


def _optuna(cfg: SweepConfig, max_concurrent: int):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(metric=cfg.asha.metric, mode="max", seed=cfg.search.seed), max_concurrent)


# search.algorithm → its Tune search algorithm (tune.config.ALGORITHMS), holding at most
# max_concurrent trials live (Tune ignores TuneConfig.max_concurrent_trials for a given generator).
SEARCHERS: dict[str, Callable[[SweepConfig, int], Any]] = {"grid": _variants, "random": _variants, "optuna": _optuna}


def penalty_label(penalty: PenaltyConfig) -> str:
    """A penalty as one short string, e.g. ``up_rlhf(beta=100)``: what Tune and the tables show."""
    coefficients = ",".join(f"{k}={v:g}" for k, v in sorted(penalty.coefficients.items()))
    return f"{penalty.name}({coefficients})" if coefficients else penalty.name


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """The Tune param space; whole penalty configs become their labels (categorical for every searcher)."""
    space = {}
    for key, param in cfg.space.items():
        spec = param.spec
        if target(key) == ALIASES["penalty"]:
            spec = [penalty_label(PenaltyConfig.model_validate(v)) for v in spec]
        space[key] = DOMAINS[param.kind](spec)
    return space


def ensemble_variants(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The ensembles to train: one per combination of the swept ensemble values ([{}]: one shared)."""
    params = cfg.ensemble_params()
    return [dict(zip(params, values)) for values in itertools.product(*(p.values for p in params.values()))]


def ensemble_key(overrides: dict[str, Any]) -> str:
    """The folder (under OUTPUT_DIR/reward) of the ensemble trained with these overrides."""
    return ",".join(f"{path}={value}" for path, value in sorted(overrides.items())) or "shared"


def reward_config(cfg: SweepConfig, overrides: dict[str, Any], data_dir: Path | None) -> TrainRewardConfig:
    """The ensemble training of one variant: only the kind the PPO runs use."""
    tree = cfg.reward.model_dump(mode="json")
    tree["kinds"] = [cfg.rl.reward_kind]
    if tree["data_dir"] is None:
        tree["data_dir"] = str(data_dir)
    for path, value in overrides.items():
        set_dotted(tree, path, value)
    return build(TrainRewardConfig, tree, f"reward {ensemble_key(overrides)}")


def reward_checkpoint(out: Path, cfg: SweepConfig, overrides: dict[str, Any]) -> Path:
    return out / "reward" / ensemble_key(overrides) / "checkpoints" / cfg.rl.reward_kind / "final"


def trial_config(cfg: SweepConfig, params: dict[str, Any], out: Path, data_dir: Path | None) -> RLConfig:
    """The PPO config of the trial with these sampled ``params`` (space key → value)."""
    tree = cfg.rl.model_dump(mode="json")
    labels = {penalty_label(p): p.model_dump() for p in cfg.penalties()}
    ensemble: dict[str, Any] = {}
    # whole sections first (penalty), then the paths inside them (its coefficients)
    for key in sorted(params, key=lambda k: target(k).count(".")):
        section, _, path = target(key).partition(".")
        value = params[key].item() if hasattr(params[key], "item") else params[key]
        if target(key) == ALIASES["penalty"]:
            value = labels[value]
        if section == "reward":
            ensemble[path] = value
        else:
            set_dotted(tree, path, value)
    if data_dir is not None and cfg.rl.prompts is None and cfg.rl.data_dir is None:
        tree["data_dir"] = str(data_dir)
    if cfg.reward is not None:
        tree["reward_checkpoint"] = str(reward_checkpoint(out, cfg, ensemble))
        tree["reward_k"] = cfg.reward.ensemble.k
    return build(RLConfig, tree, "trial")
