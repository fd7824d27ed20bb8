"""Configs of RL (``jobs.ppo``, ``jobs.best_of_n``): policy, rollout, learner, PPO, KL, penalty, alarm."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from uprlhf.data.config import DecodeWeightsName, GoldName
from uprlhf.registry import registry_name
from uprlhf.reward.config import EnsembleKind, k_problem
from uprlhf.section import ModelConfig, Section, tagged_union
from uprlhf.selection.config import SelectorConfig

PromptTemplateName = registry_name("uprlhf.rl.policy:PROMPT_TEMPLATES")
PenaltyName = registry_name("uprlhf.rl.penalties:PENALTIES")
KLEstimatorName = registry_name("uprlhf.rl.ppo:KL_ESTIMATORS")
AdvantageEstimatorName = registry_name("uprlhf.rl.estimators:ADVANTAGE_ESTIMATORS")
NoveltySpaceName = registry_name("uprlhf.rl.novelty:NOVELTY_SPACES")


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
    prompt_template: PromptTemplateName = Field(
        "sentiment_chat",
        description="How a prompt row becomes the policy's input: as it is ('plain') or wrapped in the "
        "chat template of the embedded sentiment task ('sentiment_chat').",
    )


class _RolloutSettings(Section):
    """What every rollout backend reads; each backend's config adds its own fields."""

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


class HFRolloutConfig(_RolloutSettings):
    """transformers ``generate``: the CPU default (and what the tests run)."""

    backend: Literal["hf"] = Field("hf", description="Generation backend (uprlhf.rl.rollout registry): 'hf' here.")
    decode_weights: DecodeWeightsName = Field(
        "float32",
        description="Weights generate() reads (uprlhf.rl.generation registry): 'int8' samples from int8 copies of "
        "every linear layer no LoRA adapts (CPU only), 'bfloat16' from bfloat16 casts of every weight (CPUs with "
        "bf16 matmul units; measured 1.04x); with either, log-probs still come from one float32 forward of the policy.",
    )

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> HFRolloutConfig:
        if self.decode_weights == "int8" and self.gpus_per_worker > 0:
            raise ValueError("decode_weights 'int8' is the CPU path (fbgemm kernels); set gpus_per_worker 0 or decode_weights float32")
        return self


class VLLMRolloutConfig(_RolloutSettings):
    """vLLM on a GPU (``pip install -e .[vllm]``)."""

    backend: Literal["vllm"] = Field("vllm", description="Generation backend (uprlhf.rl.rollout registry): 'vllm' here.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vllm: share of GPU memory vLLM may take.")

    @model_validator(mode="after")
    def _needs_gpu(self) -> VLLMRolloutConfig:
        if self.gpus_per_worker <= 0:
            raise ValueError("backend vllm needs gpus_per_worker > 0")
        return self


# One config type per backend, told apart by ``backend`` ('hf' when left out).
RolloutConfig = tagged_union(
    "backend", "hf", HFRolloutConfig, VLLMRolloutConfig, kind="rollout backend", registry="uprlhf.rl.rollout:ROLLOUT_ENGINES"
)


class LearnerConfig(Section):
    num_workers: int = Field(2, ge=1, description="DeepSpeed data-parallel ranks W in one placement group.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each learner rank.")
    use_gpu: bool = Field(False, description="One GPU per rank and NCCL instead of CPUs and gloo.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")


class PPOConfig(Section):
    steps: int = Field(40, ge=1, description="PPO steps (one batch of prompts each).")
    batch_size: int = Field(
        16, ge=1, description="Samples per step: batch_size / samples_per_prompt prompts, samples_per_prompt responses each."
    )
    minibatch_size: int = Field(8, ge=1, description="Samples per optimiser step, over all learner ranks.")
    epochs: int = Field(2, ge=1, description="PPO passes over each batch.")
    lr: float = Field(2e-4, gt=0, description="Learning rate of the policy (LoRA or full) and value head.")
    clip_range: float = Field(0.2, gt=0, description="Clip ε of the policy ratio.")
    value_clip_range: float = Field(0.2, gt=0, description="Clip of the value change per update.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (a critic-free estimator has none).")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount per token.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    estimator: AdvantageEstimatorName = Field(
        "gae", description="Advantage estimator (uprlhf.rl.estimators registry): 'gae' (actor-critic), or the critic-free "
        "'grpo', 'rloo', 'reinforce_baseline' (group baselines over samples_per_prompt >= 2; the value head is frozen).",
    )
    samples_per_prompt: int = Field(
        1, ge=1, description="Responses sampled per prompt (n), one group of consecutive rows; the group baselines compare them.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    whiten_rewards: bool = Field(
        False, description="Whiten sequence rewards per batch before GAE (advantages are always whitened)."
    )

    @model_validator(mode="after")
    def _groups(self) -> PPOConfig:
        from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS

        n, need = self.samples_per_prompt, ADVANTAGE_ESTIMATORS.get(self.estimator).min_group
        if n < need:
            raise ValueError(f"estimator {self.estimator!r} compares the samples of one prompt: samples_per_prompt={n} "
                             f"must be >= {need}")
        if self.batch_size % n:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of samples_per_prompt={n} "
                             "(a step samples batch_size / samples_per_prompt prompts, each samples_per_prompt times)")
        return self


class KLConfig(Section):
    placement: Literal["auto", "reward", "loss"] = Field(
        "auto",
        description="Where the KL to the reference goes: 'reward' (per-token k1 in the reward), 'loss' "
        "(a differentiable term added to the actor loss), or 'auto' (where the penalty's registration "
        "puts it: the loss for up_rlhf, nowhere else for var_kl, whose own variance-weighted KL replaces it, "
        "the reward otherwise). An explicit 'reward' or 'loss' adds that KL beside var_kl's.",
    )
    coef: float = Field(0.02, ge=0, description="KL coefficient (β₁ of UP-RLHF when in the loss).")
    loss_form: Literal["sequence_sq", "per_token"] = Field(
        "sequence_sq",
        description="The KL loss (placement 'loss'): 'sequence_sq' is UP-RLHF's Eq. 15, "
        "coef·mean over samples of (Σ_t log π_θ/π_ref)², the response's log-ratio squared, with no ½ "
        "(the paper writes none); 'per_token' is coef·the mean over response tokens of `estimator`.",
    )
    estimator: KLEstimatorName = Field(
        "k2", description="Per-token estimator of the KL loss (loss_form 'per_token', uprlhf.rl.ppo registry: "
        "k1, k2 = ½t², k3); the in-reward KL is always k1."
    )
    target: float | None = Field(
        None, gt=0, description="Target KL per sample for the adaptive controller (in-reward KL); null = fixed."
    )
    horizon: int = Field(10000, ge=1, description="Horizon (samples) of the adaptive KL controller.")


class PenaltyConfig(Section):
    name: PenaltyName = Field("mean", description="Reward shaping from the ensemble (uprlhf.rl.penalties registry).")
    coefficients: dict[str, float] = Field(
        default_factory=dict, description="The penalty's coefficients, e.g. {beta: 1.0} (up_rlhf, var_kl), {lam: 1.0} (lcb, uwo); "
        "var_kl's {power: 1} weights its KL by σ (paper 002's experiments), {power: 2} by σ² (its theorem).",
    )
    member: int | None = Field(
        None, ge=0, description="Train against ensemble member i's reward r_i instead of the ensemble mean "
        "(paper 002 trains one policy per member); the penalty still uses the whole ensemble's u. Null: the mean.",
    )

    @model_validator(mode="after")
    def _known(self) -> PenaltyConfig:
        from uprlhf.rl.penalties import PENALTIES

        penalty = PENALTIES.get(self.name)
        allowed = list(penalty.configurable)
        unknown = sorted(set(self.coefficients) - set(allowed))
        if unknown:
            raise ValueError(f"penalty {self.name!r} has no coefficient(s) {unknown}; allowed: {allowed}")
        # The registration's bounds, checked here so a bad value fails before any actor starts.
        negative = {c: v for c, v in sorted(self.coefficients.items()) if c in penalty.non_negative and not v >= 0}
        if negative:
            shown = ", ".join(f"coefficients.{c} = {v:g}" for c, v in negative.items())
            raise ValueError(f"{shown}: must be >= 0 (a strength of penalty {self.name!r})")
        return self

    def ensemble_problems(self, k: int, kind: str) -> list[str]:
        """What this penalty cannot do with a reward checkpoint of K members of ``kind``, one line each."""
        from uprlhf.rl.penalties import PENALTIES

        problems = []
        if k == 1 and PENALTIES.get(self.name).needs_uncertainty:
            problems.append(f"penalty {self.name!r} needs an ensemble uncertainty, but the reward checkpoint has "
                            f"K = 1 (kind {kind!r}); use penalty.name=mean")
        if self.member is not None and self.member >= k:
            problems.append(f"penalty.member={self.member} is out of range: the reward checkpoint has K = {k} "
                            f"member(s), so it must be 0 to {k - 1} (or null for the ensemble mean)")
        return problems


class ExtraReward(Section):
    """A plain Python rule added to the ensemble's reward (format check, length, verifier; ``uprlhf.rl.extra_rewards``)."""

    fn: str = Field(
        description="Import path 'package.module:function' of a batched rule fn(prompts, responses) returning one "
        "finite float per sample; imported when the config loads (never evaluated as code) and called on the scorer.",
    )
    weight: float = Field(description="Its weight: the reward is the penalised ensemble reward + Σ weight·rule (0 only logs it).")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Its metric name, reward_extra/<name>; default the function's name."
    )

    @field_validator("fn")
    @classmethod
    def _imports(cls, path: str) -> str:
        from uprlhf.rl.extra_rewards import resolve_callable

        resolve_callable(path)
        return path

    @property
    def label(self) -> str:
        """The name it is logged under: ``name``, else the function's own name (the path's last part)."""
        return self.name or self.fn.rpartition(":")[2].rpartition(".")[2]


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


class SampleAndScoreConfig(Section):
    """What every job that samples the policy and scores the samples with an ensemble shares."""

    prompts: str | None = Field(
        None, description="Prompt file (JSONL/Parquet/CSV/datasets folder, field 'prompt'); default DATA_DIR/rl_prompts (.parquet, .jsonl, .json, .csv or a datasets folder)."
    )
    data_dir: str | None = Field(None, description="Folder written by jobs.prepare_data; default OUTPUT_DIR/data.")
    reward_checkpoint: str | None = Field(
        None, description="Reward ensemble folder (jobs.train_reward); default OUTPUT_DIR/checkpoints/<reward_kind>/final."
    )
    reward_kind: EnsembleKind = Field("linear", description="Ensemble kind the checkpoint must hold (uprlhf.reward.ensembles registry).")
    reward_k: int = Field(5, ge=1, description="Ensemble size K the checkpoint must hold (1: kind 'single', penalty mean only).")
    reward_max_length: int = Field(64, ge=8, description="Tokens the reward models see per (prompt, response).")
    reward_normalise: bool = Field(
        False, description="Standardise each member by its reward mean and std on its training responses (saved in the "
        "checkpoint by jobs.train_reward) before the ensemble mean and u, so u is disagreement, not the members' scales.",
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The policy and its adapters.")
    rollout: RolloutConfig = Field(default_factory=HFRolloutConfig, description="Generation; the fields after `backend` depend on it.")
    gold: GoldName = Field("vader", description="Gold scorer (never seen by the policy; uprlhf.data.gold registry).")
    scorer_cpus: float = Field(1.0, gt=0, description="CPUs reserved by the reward scorer.")
    scorer_gpus: float = Field(0.0, ge=0, description="GPUs reserved by the reward scorer (> 0 runs it on a GPU).")
    scorer_threads: int | None = Field(None, ge=1, description="Torch CPU threads of the scorer; default its CPUs rounded up.")
    seed: int = Field(0, description="Seed of prompt order, sampling and initialisation.")

    @model_validator(mode="after")
    def _k_fits_kind(self) -> SampleAndScoreConfig:
        problem = k_problem(self.reward_kind, self.reward_k, "reward_k")
        if problem:
            raise ValueError(problem)
        return self


class RLConfig(SampleAndScoreConfig):
    judges: list[GoldName] = Field(
        default_factory=list, description="Further gold scorers run beside `gold` at every gold evaluation, as independent "
        "judges of the same responses (metrics judge_<name>, summary judge_<name>_final; uprlhf.data.gold registry).",
    )
    eval_prompts: int = Field(
        32, ge=1, description="Prompts held out from the end of the prompt file for the gold evaluation."
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="The DeepSpeed learner group.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference policy.")
    penalty: PenaltyConfig = Field(default_factory=PenaltyConfig, description="Uncertainty penalty.")
    extra_rewards: list[ExtraReward] = Field(
        default_factory=list, description="Rules added to the penalised ensemble reward, each {fn: 'package.module:function', "
        "weight: w} (name optional; examples in uprlhf.rl.rules), logged per step as reward_extra/<name>.",
    )
    alarm: AlarmConfig = Field(default_factory=AlarmConfig, description="Reward-hacking alarm.")
    selector: SelectorConfig = Field(default_factory=SelectorConfig, description="Reward refinement while the policy trains (off by default).")
    async_steps: int = Field(
        0, ge=0, le=1,
        description="One-step-off-policy overlap: 1 generates step t+1's responses (with the weights before step t's "
        "update) while step t trains, and PPO's ratios use the sampler's log-probs (the behaviour policy); 0 alternates "
        "generation and training, on-policy.",
    )
    gold_every: int = Field(5, ge=1, description="Steps between gold evaluations on the held-out prompts.")
    checkpoint_every: int = Field(5, ge=1, description="Steps between checkpoints (the last step is always saved).")
    weight_sync: Literal["auto", "object_store", "broadcast"] = Field(
        "auto",
        description="How weights reach the rollout workers: through Ray's object store, or broadcast over a "
        "process group of their own (NCCL on GPUs, gloo on CPUs); 'auto' broadcasts when the learner is on GPUs.",
    )
    max_retries: int = Field(
        2, ge=0, description="Rebuilds per call of a dead or hung rollout worker, scorer or replay buffer, and rebuilds "
        "of the whole run from its last checkpoint when a learner rank is lost.",
    )
    deadline_multiple: float = Field(
        10.0, gt=1, allow_inf_nan=False,
        description="A call to a role that takes longer than this many times its median so far is taken as hung: "
        "the actor is named in a warning, killed and rebuilt, and the call retried.",
    )
    deadline_floor_s: float = Field(
        120.0, gt=0, allow_inf_nan=False, description="No call is taken as hung before this many seconds."
    )
    deadline_first_s: float = Field(
        900.0, gt=0, allow_inf_nan=False,
        description="Deadline of a role's first two calls of a method (loading, compiling, warming caches).",
    )

    @model_validator(mode="after")
    def _shapes(self) -> RLConfig:
        w = self.learner.num_workers
        if self.ppo.batch_size % self.ppo.minibatch_size:
            raise ValueError(f"ppo.batch_size={self.ppo.batch_size} must be a multiple of ppo.minibatch_size={self.ppo.minibatch_size}")
        if self.ppo.minibatch_size % w:
            raise ValueError(f"ppo.minibatch_size={self.ppo.minibatch_size} must be a multiple of learner.num_workers={w}")
        return self

    @model_validator(mode="after")
    def _whole_groups(self) -> RLConfig:
        """Group statistics need every sample of a prompt on one learner rank, so no shard cuts a group."""
        n, w = self.ppo.samples_per_prompt, self.learner.num_workers
        if (self.ppo.batch_size // w) % n:
            raise ValueError(f"ppo.batch_size={self.ppo.batch_size} / learner.num_workers={w} = {self.ppo.batch_size // w} "
                             f"samples per learner rank must be a multiple of ppo.samples_per_prompt={n}, so that no rank "
                             "holds part of a prompt's group")
        return self

    @model_validator(mode="after")
    def _judges_distinct(self) -> RLConfig:
        for i, judge in enumerate(self.judges):
            if judge == self.gold or judge in self.judges[:i]:
                raise ValueError(f"judges.{i} = {judge!r}: already {'the gold' if judge == self.gold else 'a judge'}; "
                                 "each scorer judges once")
        return self

    @model_validator(mode="after")
    def _labeler_follows_gold(self) -> RLConfig:
        """A gold labeler left at its default labels with the run's own gold, so refinement and evaluation agree."""
        labeler = self.selector.labeler
        if labeler.name == "gold" and "gold" not in labeler.model_fields_set:
            labeler.gold = self.gold
        return self

    @model_validator(mode="after")
    def _distinct_extra_names(self) -> RLConfig:
        labels = [extra.label for extra in self.extra_rewards]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"extra_rewards: names {repeated} repeat (each is one metric); give each entry its own `name`")
        return self

    def broadcast_weights(self) -> bool:
        return self.weight_sync == "broadcast" or (self.weight_sync == "auto" and self.learner.use_gpu)

    def kl_placement(self) -> str:
        """'reward', 'loss' or 'penalty' (the penalty's own KL term only); 'auto' follows the penalty's registration."""
        if self.kl.placement == "auto":
            from uprlhf.rl.penalties import PENALTIES

            return PENALTIES.get(self.penalty.name).kl
        return self.kl.placement

    def kl_in_loss(self) -> bool:
        """Whether the KL is a loss term (``kl.loss_form``; UP-RLHF's Eq. 15 by default)."""
        return self.kl_placement() == "loss"

    def kl_in_reward(self) -> bool:
        """Whether the per-token k1 KL is in the reward, the only KL the adaptive controller steers."""
        return self.kl_placement() == "reward"


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



class NoveltyConfig(Section):
    """``jobs.novelty``: how far PPO runs' samples are from the reward data, and whether that distance sees their hacks.

    Everything else comes from the runs' own configs, which must agree on it: the data folder (its reward pairs
    are the reference), the reward checkpoint, the reward's token budget and the policy's model."""

    runs: list[str] = Field(min_length=1, description="PPO run folders (config.yaml and replay/) whose samples are measured.")
    spaces: list[NoveltySpaceName] = Field(
        default_factory=lambda: ["reward_heads", "reward_backbone", "policy_backbone", "token_ngrams"],
        min_length=1,
        description="Where distance is measured (uprlhf.rl.novelty.NOVELTY_SPACES).",
    )
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")

    @field_validator("runs", "spaces")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"each entry once; repeated: {', '.join(repeated)}")
        return values
