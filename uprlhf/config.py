"""Typed job configs: YAML files plus dotted ``key=value`` overrides, validated up front.

Every field carries its documentation in ``Field(description=...)`` so that
``describe(Config)`` prints the reference and a bad value is reported as one line
naming the field, the value and what is allowed, before any actor starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENSEMBLE_KINDS = ("independent", "linear", "frozen_heads", "lora", "diverse_lora")
EnsembleKind = Literal["independent", "linear", "frozen_heads", "lora", "diverse_lora"]


class ConfigError(ValueError):
    """A config that cannot be used; the message is meant to be shown as it is."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Model to load: a local folder, a hub id, or a packaged model "
        "('packaged:smollm2' policy, 'packaged:minilm' reward backbone).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model's own Python code to run; off unless you trust the source."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; float32 on CPU."
    )


class PrepareDataConfig(Section):
    policy: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:smollm2"),
        description="Policy whose own completions become the preference pairs.",
    )
    reviews_file: str | None = Field(
        None,
        description="Tab-separated review snippets (id, rating, sentence); default: the "
        "movie-review snippets shipped in the vaderSentiment sdist (fetched by `make setup`).",
    )
    off_task_file: str | None = Field(
        None,
        description="Off-task sentences for the OOD set, same format; default: the NYT "
        "editorial snippets of the same sdist.",
    )
    n_prompts: int = Field(600, ge=10, description="Review openings to use, before the split.")
    min_words: int = Field(4, ge=1, description="Fewest words in an opening.")
    max_words: int = Field(8, ge=1, description="Most words in an opening.")
    completions_per_prompt: int = Field(
        2, ge=2, description="Completions sampled per prompt; consecutive ones are paired."
    )
    max_new_tokens: int = Field(24, ge=1, le=512, description="Tokens generated per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the policy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    generation_batch_size: int = Field(32, ge=1, description="Prompts per generate call.")
    gold: Literal["vader", "textblob"] = Field("vader", description="Gold scorer that labels the pairs.")
    bt_temperature: float = Field(
        0.1, gt=0, description="Bradley-Terry temperature: P(a>b) = sigmoid((gold_a - gold_b)/T)."
    )
    label_noise: float = Field(
        0.1, ge=0, le=0.5, description="Probability that a drawn preference label is flipped."
    )
    split: tuple[float, float, float] = Field(
        (0.2, 0.4, 0.4), description="Fractions of prompts for SFT, reward modelling and RL."
    )
    reward_test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of the reward pairs held out for evaluation."
    )
    n_ood: int = Field(200, ge=10, description="Out-of-distribution responses for the OOD AUROC.")
    seed: int = Field(0, description="Seed of prompt choice, sampling and label draws.")

    @model_validator(mode="after")
    def _check(self) -> PrepareDataConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ValueError(f"split {self.split} must be three positive fractions summing to 1")
        return self


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
        description="Folder written by jobs.prepare_data (reward_train/reward_test/ood "
        "Parquet files); default: OUTPUT_DIR/data.",
    )
    backbone: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:minilm"),
        description="Encoder (or decoder) under the reward heads.",
    )
    kinds: list[EnsembleKind] = Field(
        default_factory=lambda: list(ENSEMBLE_KINDS),
        min_length=1,
        description=f"Ensemble kinds to train and compare; any of {', '.join(ENSEMBLE_KINDS)}.",
    )
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="Ensemble shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    max_chars: int = Field(4000, ge=1, description="Longest text accepted in the data files.")
    skip_bad_rows: bool = Field(
        False, description="Drop invalid data rows (counted in summary.json) instead of failing."
    )


class PolicyConfig(Section):
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:smollm2"),
        description="Causal LM to optimise; its untouched copy is the reference policy.",
    )
    lora_rank: int | None = Field(
        16, ge=1, description="LoRA rank of the policy; null trains every weight (and syncs all of them)."
    )
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (alpha / r).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names that get LoRA adapters (attention projections of Llama-style models).",
    )
    prompt_template: Literal["plain", "sentiment_chat"] = Field(
        "sentiment_chat",
        description="How a prompt row becomes the policy's input: as it is ('plain') or wrapped in the "
        "chat template of the embedded sentiment task ('sentiment_chat').",
    )


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Generation backend: 'hf' (transformers generate, CPU default) or 'vllm' (GPU)."
    )
    num_workers: int = Field(1, ge=1, description="Rollout workers R; each generates a slice of the batch.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each rollout worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved by each rollout worker (vllm: > 0).")
    torch_threads: int | None = Field(
        None, ge=1, description="Torch CPU threads per worker; default its CPUs rounded up. Stages run one "
        "after another, so on a small node a worker may use more threads than it reserves.",
    )
    max_new_tokens: int = Field(24, ge=1, le=4096, description="Response length limit in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same one).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 samples the policy itself.")
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of GPU memory vLLM may take (vllm backend)."
    )


class LearnerConfig(Section):
    num_workers: int = Field(2, ge=1, description="DeepSpeed data-parallel ranks W in one placement group.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each learner rank.")
    use_gpu: bool = Field(False, description="One GPU per rank and NCCL instead of CPUs and gloo.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")


class PPOConfig(Section):
    steps: int = Field(40, ge=1, description="PPO steps (one batch of prompts each).")
    batch_size: int = Field(16, ge=1, description="Prompts per step (one response each).")
    minibatch_size: int = Field(8, ge=1, description="Samples per optimiser step, over all learner ranks.")
    epochs: int = Field(2, ge=1, description="PPO passes over each batch.")
    lr: float = Field(2e-4, gt=0, description="Learning rate of the policy (LoRA or full) and value head.")
    clip_range: float = Field(0.2, gt=0, description="Clip ε of the policy ratio.")
    value_clip_range: float = Field(0.2, gt=0, description="Clip of the value change per update.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount per token.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    whiten_rewards: bool = Field(
        False, description="Whiten sequence rewards per batch before GAE (advantages are always whitened)."
    )


class KLConfig(Section):
    placement: Literal["auto", "reward", "loss"] = Field(
        "auto",
        description="Where the KL to the reference goes: 'reward' (per-token k1 in the reward), 'loss' "
        "(a differentiable estimator added to the actor loss), or 'auto' (loss for up_rlhf, reward otherwise).",
    )
    coef: float = Field(0.02, ge=0, description="KL coefficient (β₁ of UP-RLHF when in the loss).")
    estimator: Literal["k1", "k2", "k3"] = Field(
        "k2", description="Estimator of the KL loss (placement 'loss'); the in-reward KL is always k1."
    )
    target: float | None = Field(
        None, gt=0, description="Target KL per sample for the adaptive controller (in-reward KL); null = fixed."
    )
    horizon: int = Field(10000, ge=1, description="Horizon (samples) of the adaptive KL controller.")


class PenaltyConfig(Section):
    name: str = Field("mean", description="Reward shaping from the ensemble (uprlhf.rl.penalties registry).")
    coefficients: dict[str, float] = Field(
        default_factory=dict, description="The penalty's coefficients, e.g. {beta: 1.0} (up_rlhf, var_kl), {lam: 1.0} (lcb, uwo)."
    )

    @model_validator(mode="after")
    def _known(self) -> PenaltyConfig:
        from uprlhf.rl.penalties import PENALTIES, RUN_STATE_INPUTS

        if self.name not in PENALTIES:
            raise ValueError(f"unknown penalty {self.name!r}; allowed: {', '.join(sorted(PENALTIES))}")
        penalty = PENALTIES[self.name]
        allowed = [c for c in penalty.coefficients if c not in RUN_STATE_INPUTS]
        unknown = sorted(set(self.coefficients) - set(allowed))
        if unknown:
            raise ValueError(f"penalty {self.name!r} has no coefficient(s) {unknown}; allowed: {allowed}")
        return self


class AlarmConfig(Section):
    warmup_steps: int = Field(5, ge=2, description="Steps that only form the uncertainty band; the alarm cannot fire before.")
    band_sigmas: float = Field(2.0, ge=0, description="u is out of its band when above the band mean + this many stds.")
    band_window: int = Field(50, ge=2, description="The band is the last this many non-firing steps (follows slow drift of u).")
    trend_window: int = Field(5, ge=2, description="Steps, the current one included, over which the proxy's slope must be > 0.")
    min_std: float = Field(1e-8, ge=0, description="Floor on the band std, so a flat band does not fire on rounding noise.")

    @model_validator(mode="after")
    def _window(self) -> AlarmConfig:
        if self.band_window < self.warmup_steps:
            raise ValueError(f"band_window={self.band_window} must be >= warmup_steps={self.warmup_steps}")
        return self


LabelerName = Literal["gold", "llm_judge", "human"]
SelectionStrategy = Literal["ugda", "uncertainty", "influence", "random"]


class LabelerConfig(Section):
    """The expert that relabels selected samples on a 1-5 scale (uprlhf.selection.labelers registry)."""

    name: LabelerName = Field("gold", description="gold (the gold scorer in quintiles), llm_judge (an OpenAI-compatible chat API) or human (a label queue on disk).")
    gold: Literal["vader", "textblob"] = Field("vader", description="gold: the scorer whose quintiles over each labelled batch become 1-5.")
    base_url: str | None = Field(None, description="llm_judge: base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="llm_judge: model name sent with each request.")
    api_key_env: str = Field("OPENAI_API_KEY", description="llm_judge: environment variable holding the API key (the key itself is never in a config or log).")
    timeout_s: float = Field(30.0, gt=0, description="llm_judge: seconds before a request is abandoned.")
    max_retries: int = Field(3, ge=0, description="llm_judge: retries of a failed or timed-out request, with exponential back-off.")
    backoff_s: float = Field(1.0, ge=0, description="llm_judge: first back-off delay; doubles at each retry.")
    queue_dir: str | None = Field(None, description="human: folder of the label queue (queue JSONL out, answers JSONL in); default OUTPUT_DIR/labels.")
    wait_s: float = Field(3600.0, ge=0, description="human: how long to wait for the answers file before giving up on a batch.")
    poll_s: float = Field(5.0, gt=0, description="human: seconds between looks for the answers file.")

    @model_validator(mode="after")
    def _judge_endpoint(self) -> LabelerConfig:
        if self.name == "llm_judge" and (not self.base_url or not self.model):
            raise ValueError("labeler llm_judge needs base_url and model")
        return self


class SelectorConfig(Section):
    """Reward refinement on the replay buffer (DESIGN §1): select, relabel, refine, publish."""

    strategy: Literal["off", "ugda", "uncertainty", "influence", "random"] = Field(
        "off", description="off, ugda (uncertainty then influence), uncertainty only, influence only, or random (same budget)."
    )
    every: int = Field(5, ge=1, description="Policy steps between selections; each reads the replay rows added since the last.")
    gamma: float = Field(0.5, gt=0, le=1, description="Share of the candidates kept by the uncertainty filter (top by ensemble variance).")
    eta: float = Field(0.5, gt=0, le=1, description="Share of the filtered candidates kept by influence ranking.")
    projection_dim: int = Field(1024, ge=16, description="d of the Rademacher projection of per-sample gradients (8192 on GPU).")
    projection_seed: int = Field(0, description="Seed of the Rademacher projection matrix.")
    adam_eps: float = Field(1e-8, gt=0, description="epsilon in the Adam normalisation m / sqrt(v + eps) of candidate gradients.")
    validation: str | None = Field(
        None, description="Preference file whose chosen responses are the validation set (optional 'subtask' column); default DATA_DIR/reward_test.parquet."
    )
    validation_per_subtask: int = Field(64, ge=1, description="Validation responses used per subtask.")
    labeler: LabelerConfig = Field(default_factory=LabelerConfig, description="The expert.")
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


class SampleAndScoreConfig(Section):
    """What every job that samples the policy and scores the samples with an ensemble shares."""

    prompts: str | None = Field(
        None, description="Prompt file (JSONL/Parquet/CSV/datasets folder, field 'prompt'); default DATA_DIR/rl_prompts.parquet."
    )
    data_dir: str | None = Field(None, description="Folder written by jobs.prepare_data; default OUTPUT_DIR/data.")
    reward_checkpoint: str | None = Field(
        None, description="Reward ensemble folder (jobs.train_reward); default OUTPUT_DIR/checkpoints/<reward_kind>/final."
    )
    reward_kind: EnsembleKind = Field("linear", description="Ensemble kind the checkpoint must hold.")
    reward_k: int = Field(5, ge=2, description="Ensemble size K the checkpoint must hold.")
    reward_max_length: int = Field(64, ge=8, description="Tokens the reward models see per (prompt, response).")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The policy and its adapters.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation.")
    gold: Literal["vader", "textblob"] = Field("vader", description="Gold scorer (never seen by the policy).")
    scorer_cpus: float = Field(1.0, gt=0, description="CPUs reserved by the reward scorer.")
    scorer_gpus: float = Field(0.0, ge=0, description="GPUs reserved by the reward scorer (> 0 runs it on a GPU).")
    scorer_threads: int | None = Field(None, ge=1, description="Torch CPU threads of the scorer; default its CPUs rounded up.")
    seed: int = Field(0, description="Seed of prompt order, sampling and initialisation.")


class RLConfig(SampleAndScoreConfig):
    eval_prompts: int = Field(
        32, ge=1, description="Prompts held out from the end of the prompt file for the gold evaluation."
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="The DeepSpeed learner group.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference policy.")
    penalty: PenaltyConfig = Field(default_factory=PenaltyConfig, description="Uncertainty penalty.")
    alarm: AlarmConfig = Field(default_factory=AlarmConfig, description="Reward-hacking alarm.")
    selector: SelectorConfig = Field(default_factory=SelectorConfig, description="Reward refinement while the policy trains (off by default).")
    gold_every: int = Field(5, ge=1, description="Steps between gold evaluations on the held-out prompts.")
    checkpoint_every: int = Field(5, ge=1, description="Steps between checkpoints (the last step is always saved).")
    weight_sync: Literal["auto", "object_store", "broadcast"] = Field(
        "auto",
        description="How weights reach the rollout workers: through Ray's object store, or broadcast over a "
        "process group of their own (NCCL on GPUs, gloo on CPUs); 'auto' broadcasts when the learner is on GPUs.",
    )
    max_retries: int = Field(2, ge=0, description="Restarts of a dead rollout worker or scorer per step.")

    @model_validator(mode="after")
    def _shapes(self) -> RLConfig:
        w = self.learner.num_workers
        if self.ppo.batch_size % self.ppo.minibatch_size:
            raise ValueError(f"ppo.batch_size={self.ppo.batch_size} must be a multiple of ppo.minibatch_size={self.ppo.minibatch_size}")
        if self.ppo.minibatch_size % w:
            raise ValueError(f"ppo.minibatch_size={self.ppo.minibatch_size} must be a multiple of learner.num_workers={w}")
        if self.rollout.backend == "vllm" and self.rollout.gpus_per_worker <= 0:
            raise ValueError("rollout.backend=vllm needs rollout.gpus_per_worker > 0")
        return self

    def broadcast_weights(self) -> bool:
        return self.weight_sync == "broadcast" or (self.weight_sync == "auto" and self.learner.use_gpu)

    def kl_in_loss(self) -> bool:
        """UP-RLHF moves the KL out of the reward into a k2 loss (DESIGN §1); 'auto' follows that."""
        if self.kl.placement == "auto":
            return self.penalty.name == "up_rlhf"
        return self.kl.placement == "loss"


class BestOfNConfig(SampleAndScoreConfig):
    n_prompts: int = Field(32, ge=1, description="Prompts evaluated (the last rows of the prompt file: RL's held-out ones).")
    n: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1, description="Values of n to compare, e.g. [1, 4, 16].")
    penalties: list[PenaltyConfig] = Field(
        default_factory=lambda: [PenaltyConfig(name="mean"), PenaltyConfig(name="lcb"), PenaltyConfig(name="up_rlhf")],
        min_length=1,
        description="Rankers: each picks the response with its highest shaped reward.",
    )

    @model_validator(mode="after")
    def _positive_n(self) -> BestOfNConfig:
        if min(self.n) < 1:
            raise ValueError(f"every n must be >= 1, got {self.n}")
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


class PipelineRLConfig(Section):
    base: RLConfig = Field(default_factory=RLConfig, description="Settings shared by every penalty run.")
    penalties: list[PenaltyConfig] = Field(
        default_factory=lambda: [PenaltyConfig(name="mean"), PenaltyConfig(name="up_rlhf", coefficients={"beta": 1.0})],
        min_length=1,
        description="Penalties compared from the same start, each a PPO run in OUTPUT_DIR/rl/<name>.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> PipelineRLConfig:
        names = [p.name for p in self.penalties]
        if len(set(names)) != len(names):
            raise ValueError(f"penalties must have distinct names (each is one run folder), got {names}")
        return self


class PipelineConfig(Section):
    data: PrepareDataConfig = Field(default_factory=PrepareDataConfig, description="Step 1 data.")
    reward: TrainRewardConfig = Field(default_factory=TrainRewardConfig, description="Step 2 ensembles.")
    rl: PipelineRLConfig = Field(default_factory=PipelineRLConfig, description="Step 3 PPO per penalty.")
    selector: SelectorConfig = Field(
        default_factory=SelectorConfig,
        description="Reward refinement during every PPO run (off, or a strategy); the pipeline's one place for it.",
    )

    @model_validator(mode="after")
    def _one_selector(self) -> PipelineConfig:
        if self.rl.base.selector.enabled:
            raise ValueError("set the selector at the top level ('selector.strategy=...'), not in rl.base.selector")
        return self


C = TypeVar("C", bound=BaseModel)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in nested dicts, creating the levels that are missing."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (so 3, true, [a, b] keep their types)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.problem})") from None
    return key.strip(), value


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = model
    for part in loc[:-1]:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return []
        node = field.annotation
    return sorted(getattr(node, "model_fields", {}))


def _format_error(model: type[BaseModel], err: dict) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(config)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_fields(model, loc)
        return f"{where}: unknown field; allowed: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if loc:
        return f"{where} = {err.get('input')!r}: {msg}"
    return f"{where}: {msg}"


def build(model: type[C], tree: dict, source: str = "config") -> C:
    """Validate a plain dict into ``model``; the error lists every bad field, one per line."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        lines = [_format_error(model, e) for e in err.errors()]
        raise ConfigError(f"{source}: " + "\n".join(lines)) from None


def load_config(model: type[C], path: str | Path | None, overrides: list[str] = ()) -> C:
    """Read YAML (optional), apply dotted overrides, validate."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of fields")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build(model, tree, source)


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def fingerprint(config: BaseModel) -> str:
    """Stable hash of a config, used to tell whether cached outputs still match it."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per field, dotted, with its type, default and documentation."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{key}: {field.description}")
            lines.extend(describe(annotation, f"{key}."))
        else:
            default = field.get_default(call_default_factory=True)
            lines.append(f"{key} (default {default!r}): {field.description}")
    return lines
