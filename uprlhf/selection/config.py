"""Configs of reward refinement (``jobs.ppo``'s selector, ``jobs.refine``): the expert, the selector, the offline study."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from uprlhf.data.config import GoldName
from uprlhf.registry import registry_name
from uprlhf.section import Section, tagged_union

STRATEGIES_PATH = "uprlhf.selection.strategies:STRATEGIES"
# A selection strategy by name; the selector also takes "off".
SelectionStrategy = registry_name(STRATEGIES_PATH)
SelectorStrategy = registry_name(STRATEGIES_PATH, "off")


class GoldLabelerConfig(Section):
    """The gold scorer as the expert, in quintiles of the candidate pool (no network; the default)."""

    name: Literal["gold"] = Field("gold", description="The expert: gold (the gold scorer in quintiles) here.")
    gold: GoldName = Field("vader", description="gold: the scorer whose quintiles over each labelled batch become 1-5; in a PPO run, "
                         "left out, the run's own rl.gold.")


class LLMJudgeLabelerConfig(Section):
    """An LLM behind an OpenAI-compatible chat API as the expert."""

    name: Literal["llm_judge"] = Field("llm_judge", description="The expert: llm_judge (an OpenAI-compatible chat API) here.")
    base_url: str = Field(description="llm_judge: base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="llm_judge: model name sent with each request.")
    api_key_env: str = Field("OPENAI_API_KEY", description="llm_judge: environment variable holding the API key (the key itself is never in a config or log).")
    timeout_s: float = Field(30.0, gt=0, description="llm_judge: seconds before a request is abandoned.")
    max_retries: int = Field(3, ge=0, description="llm_judge: retries of a failed or timed-out request, with exponential back-off.")
    backoff_s: float = Field(1.0, ge=0, description="llm_judge: first back-off delay; doubles at each retry.")

    @model_validator(mode="after")
    def _endpoint(self) -> LLMJudgeLabelerConfig:
        if not self.base_url or not self.model:
            raise ValueError("labeler llm_judge needs base_url and model")
        return self


class HumanLabelerConfig(Section):
    """A person as the expert, through a label queue on disk."""

    name: Literal["human"] = Field("human", description="The expert: human (a label queue on disk) here.")
    queue_dir: str | None = Field(None, description="human: folder of the label queue (queue JSONL out, answers JSONL in); default OUTPUT_DIR/labels.")
    wait_s: float = Field(3600.0, ge=0, description="human: how long to wait for the answers file before giving up on a batch.")
    poll_s: float = Field(5.0, gt=0, description="human: seconds between looks for the answers file.")


# One config type per labeler, told apart by ``name`` ('gold' when left out); the
# registry (``uprlhf.selection.labelers.LABELERS``) holds one labeler per member.
LabelerConfig = tagged_union(
    "name", "gold", GoldLabelerConfig, LLMJudgeLabelerConfig, HumanLabelerConfig, kind="labeler",
    registry="uprlhf.selection.labelers:LABELERS",
)


class SelectorConfig(Section):
    """Reward refinement on the replay buffer (DESIGN §1): select, relabel, refine, publish."""

    strategy: SelectorStrategy = Field(
        "off", description="off, or a selection strategy (uprlhf.selection.strategies registry): ugda (uncertainty then "
        "influence), uncertainty only, influence only, or random (same budget)."
    )
    every: int = Field(5, ge=1, description="Policy steps between selections; each reads the replay rows added since the last.")
    wait_steps: int | None = Field(
        None, ge=1,
        description="None: a finished round is published at the next step (the step varies with timing). n: a round started "
        "after step s is published at step s + n, waited for if need be (at most `every`), so a seeded run is reproducible.",
    )
    gamma: float = Field(0.5, gt=0, le=1, description="Share of the candidates kept by the uncertainty filter (top by ensemble variance).")
    eta: float = Field(0.5, gt=0, le=1, description="Share of the filtered candidates kept by influence ranking.")
    projection_dim: int = Field(1024, ge=16, description="d of the Rademacher projection of per-sample gradients (8192 on GPU).")
    projection_seed: int = Field(0, description="Seed of the Rademacher projection matrix.")
    adam_eps: float = Field(1e-8, gt=0, description="epsilon in the Adam normalisation m / sqrt(v + eps) of candidate gradients.")
    validation: str | None = Field(
        None, description="Preference file whose chosen responses are the validation set (optional 'subtask' column); default DATA_DIR/reward_test (any data format)."
    )
    validation_per_subtask: int = Field(64, ge=1, description="Validation responses used per subtask.")
    subtask_aggregation: Literal["mean", "max"] = Field(
        "mean", description="How a candidate's influence on the validation subtasks is combined: mean (UGDA's experiments) or max (its §4.2, Eq. 12)."
    )
    labeler: LabelerConfig = Field(
        default_factory=GoldLabelerConfig, description="The expert (uprlhf.selection.labelers registry); the fields after `name` depend on it."
    )
    noise_std: float = Field(0.01, ge=0, description="Std of the Gaussian noise added to each quantile target (reward units).")
    epochs: int = Field(3, ge=1, description="Passes of MSE refinement over the labelled samples.")
    lr: float = Field(1e-3, gt=0, description="Learning rate of the refined parameters (LoRA matrices, or the heads of head kinds).")
    batch_size: int = Field(16, ge=1, description="Samples per refinement step.")
    cpus: float = Field(0.5, gt=0, description="CPUs reserved by the selector actor.")
    gpus: float = Field(0.0, ge=0, description="GPUs reserved by the selector actor (> 0 runs it on a GPU).")
    threads: int = Field(1, ge=1, description="Torch CPU threads of the selector.")
    seed: int = Field(0, description="Seed of random selection, target noise and refinement shuffling.")

    @property
    def enabled(self) -> bool:
        return self.strategy != "off"

    @model_validator(mode="after")
    def _wait_within_every(self) -> SelectorConfig:
        if self.wait_steps is not None and self.wait_steps > self.every:
            raise ValueError(f"selector.wait_steps={self.wait_steps} must be <= selector.every={self.every}: a round is "
                             "published before the next one starts")
        return self


class RefineConfig(Section):
    """Offline reward refinement on a finished PPO run's replay buffer, strategy against strategy."""

    run_dir: str = Field(description="A jobs.ppo output folder (config.yaml, replay/), e.g. DIR/rl/mean of the demo.")
    strategies: list[SelectionStrategy] = Field(
        default_factory=lambda: ["ugda", "uncertainty", "influence", "random"],
        min_length=1,
        description="Strategies compared at the same labelling budget; 'none' (the unrefined ensemble) is always the baseline.",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Seeds; each reruns selection noise, refinement and retraining.")
    selector: SelectorConfig = Field(
        default_factory=lambda: SelectorConfig(strategy="ugda"),
        description="Selection, labelling and refinement settings; strategy and seed are set from strategies and seeds.",
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Replay rows held out from selection; their gold-labelled pairs measure the refined ensembles."
    )
    best_of_n: int = Field(16, ge=0, description="n of the best-of-n policy ranked by each ensemble (0 skips it).")
    best_of_n_prompts: int = Field(24, ge=1, description="Held-out prompts of the run sampled for best-of-n.")
    retrain: bool = Field(False, description="Train a fresh policy with PPO against each refined ensemble (and the unrefined one).")
    retrain_overrides: list[str] = Field(
        default_factory=list, description="Dotted overrides on the run's own config for retraining, e.g. ['ppo.steps=10']."
    )

    @model_validator(mode="after")
    def _distinct(self) -> RefineConfig:
        if len(set(self.strategies)) != len(self.strategies) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"strategies and seeds must not repeat, got {self.strategies} and {self.seeds}")
        return self
