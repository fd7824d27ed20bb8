"""Config of the data step (``jobs.prepare_data``) and the name of a gold scorer."""

from __future__ import annotations

from pydantic import Field, model_validator

from uprlhf.registry import registry_name
from uprlhf.section import ModelConfig, Section

# A gold scorer by name: an entry of ``uprlhf.data.gold.GOLD_SCORERS``.
GoldName = registry_name("uprlhf.data.gold:GOLD_SCORERS")
# The weights the sampler reads: an entry of ``uprlhf.rl.generation.DECODE_WEIGHTS``.
DecodeWeightsName = registry_name("uprlhf.rl.generation:DECODE_WEIGHTS")


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
        2, ge=2, description="Completions sampled per prompt; every two of them form a pair (c·(c−1)/2 per prompt)."
    )
    sft_completions_per_prompt: int = Field(
        0, ge=0, description="Completions sampled per SFT prompt; the gold-best one becomes the SFT example (sft.parquet, "
        "for jobs.sft). 0 writes no SFT examples.",
    )
    drift_policies: list[str] = Field(
        default_factory=list,
        description="LoRA adapters of policies trained against a proxy (a PPO checkpoint's policy/ folder, on the same "
        "base policy). Each samples completions_per_prompt more completions for every training prompt of the reward "
        "split, and all completions of a prompt, from any policy, pair with each other, so the reward data covers where "
        "RL drifts (iterated RLHF). The held-out pairs stay the base policy's own.",
    )
    max_new_tokens: int = Field(24, ge=1, le=512, description="Tokens generated per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the policy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    generation_batch_size: int = Field(32, ge=1, description="Prompts per generate call.")
    decode_weights: DecodeWeightsName = Field(
        "float32", description="Weights the sampler reads (uprlhf.rl.generation registry): 'int8' samples from int8 copies "
        "of the linear layers (CPU), 'bfloat16' from bfloat16 casts of every weight (CPUs with bf16 matmul units).",
    )
    gold: GoldName = Field("vader", description="Gold scorer that labels the pairs (uprlhf.data.gold registry).")
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
