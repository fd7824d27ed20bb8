"""The inputs of the jobs that sample the policy and score the samples, checked before any actor starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from uprlhf.config import RLConfig, SampleAndScoreConfig
from uprlhf.data.loaders import DataError, load_preferences, load_prompts
from uprlhf.paths import RunPaths, data_paths

log = logging.getLogger("uprlhf")


@dataclass
class SamplingInputs:
    """Prompts, reward checkpoint and the policy's pad id of a job that samples and scores."""

    prompts: list[str]
    reward_checkpoint: Path
    pad_id: int


@dataclass
class RLInputs:
    """Everything a PPO run needs, validated before any actor starts."""

    train_prompts: list[str]
    eval_prompts: list[str]
    reward_checkpoint: Path
    pad_id: int
    validation: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # the selector's, by subtask
    influence_checkpoints: list[Path] = field(default_factory=list)


def reward_checkpoint_of(cfg: SampleAndScoreConfig, out: Path) -> Path:
    """The configured reward checkpoint, else OUTPUT_DIR/checkpoints/<reward_kind>/final."""
    return Path(cfg.reward_checkpoint) if cfg.reward_checkpoint else RunPaths(out).reward_checkpoint(cfg.reward_kind)


def sampling_inputs(cfg: SampleAndScoreConfig, out: Path) -> SamplingInputs:
    """Prompts, reward checkpoint and policy pad id, checked; every problem goes into one DataError.

    Unreadable or empty prompts (file, row, field), prompts that do not fit the policy's
    context, LoRA targets the policy has no module for, a checkpoint of another kind or K.
    """
    from transformers import AutoConfig

    from uprlhf.models import load_tokenizer, lora_target_problem, resolve
    from uprlhf.rl.rollout import check_prompt_lengths
    from uprlhf.rl.scoring import check_reward_checkpoint

    checkpoint = reward_checkpoint_of(cfg, out)
    problems = check_reward_checkpoint(checkpoint, cfg.reward_kind, cfg.reward_k, cfg.reward_normalise)
    prompts: list[str] = []
    try:
        prompts_path = Path(cfg.prompts) if cfg.prompts else data_paths(cfg.data_dir, out).find("rl_prompts")
        prompts = [row["prompt"] for row in load_prompts(prompts_path).rows]
    except (DataError, FileNotFoundError) as err:
        problems.append(str(err))
    tokenizer = load_tokenizer(cfg.policy.model)
    model_config = AutoConfig.from_pretrained(resolve(cfg.policy.model.name_or_path), trust_remote_code=cfg.policy.model.trust_remote_code)
    if cfg.policy.lora_rank is not None:
        problem = lora_target_problem(cfg.policy.model, cfg.policy.lora_target_modules, "policy.lora_target_modules", config=model_config)
        problems += [problem] if problem else []
    if prompts:
        limit = getattr(model_config, "max_position_embeddings", None)
        problems += check_prompt_lengths(prompts, cfg.policy, cfg.rollout, tokenizer, limit, str(prompts_path))
    if problems:
        raise DataError(problems)
    return SamplingInputs(prompts, checkpoint, tokenizer.pad_token_id)


def rl_inputs(cfg: RLConfig, out: Path) -> RLInputs:
    """The shared checks, plus a penalty the reward checkpoint can serve (an uncertainty needs K > 1; a
    ``penalty.member`` below K) and enough prompts left for training once the evaluation ones are held out."""
    sampling = sampling_inputs(cfg, out)
    prompts = sampling.prompts
    # reward_k and reward_kind are the checkpoint's own here: sampling_inputs checked them against its manifest.
    problems = cfg.penalty.ensemble_problems(cfg.reward_k, cfg.reward_kind)
    if len(prompts) <= cfg.eval_prompts:
        problems.append(f"{len(prompts)} prompts leave none for training after eval_prompts={cfg.eval_prompts}")
    if problems:
        raise DataError(problems)
    inputs = RLInputs(prompts[: -cfg.eval_prompts], prompts[-cfg.eval_prompts :], sampling.reward_checkpoint, sampling.pad_id)
    if cfg.selector.enabled:
        inputs.validation, inputs.influence_checkpoints = selector_inputs(cfg, out, sampling.reward_checkpoint)
    return inputs


def selector_inputs(cfg: SampleAndScoreConfig, out: Path, checkpoint: Path) -> tuple[dict, list[Path]]:
    """The selector's validation set (held-out chosen responses by subtask) and influence checkpoints, checked."""
    from uprlhf.reward.ensembles import MANIFEST
    from uprlhf.reward.training import MOMENTS_FILE
    from uprlhf.selection.selector import influence_checkpoints, validation_sets

    sel = cfg.selector
    path = Path(sel.validation) if sel.validation else data_paths(cfg.data_dir, out).find("reward_test")
    rows = load_preferences(path).rows
    checkpoints = influence_checkpoints(checkpoint)
    problems = [f"{c}: not a reward ensemble checkpoint (no {MANIFEST})" for c in checkpoints if not (c / MANIFEST).exists()]
    if problems:
        raise DataError(problems)
    if sel.strategy in ("ugda", "influence") and not all((c / MOMENTS_FILE).exists() for c in checkpoints):
        log.warning("%s has checkpoints without Adam moments (trained with ZeRO > 0?); "
                    "influence uses plain gradients for the candidates there", checkpoint.parent)
    return validation_sets(rows, sel.validation_per_subtask, sel.seed), checkpoints
