"""TRL's PPO as an outside baseline for the RL throughput benchmark.

Our own RL loop is only judged fairly against a well-known implementation doing the
same work, so this runs TRL's PPO (``trl.experimental.ppo.PPOTrainer``; TRL 1.12.0
is the last release that ships PPO — 1.13 removed it) on the same policy folder,
prompts, batch size, response length, sampling temperature and CPU threads, and
reports generated response tokens per second of the training loop.

Setup mirrors TRL's own PPO example: the policy is trained, a frozen copy is the
reference, and the reward and value models are ``AutoModelForSequenceClassification``
with ``num_labels=1`` loaded from the same folder (TRL's PPO runs every model on the
policy's token ids, so they must share its tokenizer; their score heads are freshly
initialised, which does not change the cost). One rollout batch of ``batch_size``
prompts per update, one PPO epoch, one mini-batch, no gradient accumulation, the
whole batch generated in one ``generate`` call, sampling at temperature 1.0 (top-k
and top-p off) and stopping at the tokenizer's EOS like our sampler does. No
evaluation, sample generations, checkpoints, logging integrations or hub access.

With ``lora`` (the rank, alpha and target modules of our policy's adapter), the policy
is trained as that LoRA through TRL's own ``peft_config`` and the reference is the
policy with its adapter disabled (TRL's PEFT path, so no reference copy is loaded):
the like-for-like comparison with our LoRA policy. TRL still trains its separate
value model in full there; that is how TRL's PPO is built.

Timed: the wall time of ``PPOTrainer.train()`` between the ``on_train_begin`` and
``on_train_end`` callbacks — generation, the reference/value/reward forwards,
advantage computation and the policy+value update of every step. Not timed: model
and tokenizer loading, tokenising the prompts and building the trainer (optimizer,
accelerate wrapping).

Generated tokens are counted from what the trainer's own rollout produced: the
module-level ``batch_generation`` that ``PPOTrainer.train`` calls is wrapped for the
run, and per row the response counts up to and including the first EOS, or all
decoded positions when the row has no EOS (positions after EOS are padding that
``generate`` fills in, not decoded tokens). Counting "non-pad" tokens would be wrong
here because SmolLM2's pad token is its EOS.

Imported lazily by ``python -m jobs.benchmark rl``; needs the ``bench`` extra
(``pip install -e '.[bench]'``, which adds only trl; or ``pip install --no-deps trl==1.12.0``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from pathlib import Path

ALGORITHM = "ppo"


def _count_generated(responses, stop_token_id: int | None) -> int:
    """Decoded tokens in a ``[B, T]`` block of responses: through the first stop token, else all T."""
    import torch

    length = responses.shape[1]
    if stop_token_id is None:
        return int(responses.shape[0] * length)
    is_stop = responses == stop_token_id
    through_stop = is_stop.int().argmax(1) + 1  # argmax finds the first True
    per_row = torch.where(is_stop.any(1), through_stop, torch.full_like(through_stop, length))
    return int(per_row.sum())


@contextlib.contextmanager
def _quiet_trl_warnings():
    """Silence the pinned TRL's own noise under transformers 5 (not ours to fix)."""
    with warnings.catch_warnings():
        # PolicyAndValueWrapper reads the deprecated `is_gradient_checkpointing`.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # The `val/ratio_var` metric takes var() of one value with one PPO epoch and mini-batch.
        warnings.filterwarnings("ignore", message=r"var\(\): degrees of freedom", category=UserWarning)
        yield


def trl_tokens_per_second(
    policy_dir: str,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    steps: int,
    threads: int,
    seed: int,
    work_dir: str,
    lora: dict | None = None,
) -> dict:
    """Run ``steps`` TRL PPO updates on ``policy_dir`` and return the generated tokens per second.

    ``prompts`` are cycled to fill ``steps * batch_size`` rollouts. ``work_dir`` is
    only TRL's ``output_dir`` (created, left empty). Returns ``tokens_per_second``,
    ``seconds`` (timed training loop), ``steps``, ``generated_tokens``, ``rollouts``,
    ``step_seconds`` and ``step_tokens`` (per update, to drop a warm-up step),
    ``trl_version``, ``algorithm``, ``threads`` and ``lora`` (``r``, ``lora_alpha`` and
    ``target_modules`` of the policy's adapter, or ``None`` for full fine-tuning). torch's thread count is set to
    ``threads`` for the call and restored afterwards.
    """
    if not prompts:
        raise ValueError("trl_tokens_per_second needs at least one prompt")
    if min(batch_size, max_new_tokens, steps, threads) < 1:
        raise ValueError("batch_size, max_new_tokens, steps and threads must all be >= 1")
    # Never reach the hub (these are read when huggingface_hub is first imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental

    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(policy_dir, prompts, batch_size, max_new_tokens, steps, threads, seed, work_dir, lora)
    finally:
        torch.set_num_threads(previous_threads)


def _train(policy_dir, prompts, batch_size, max_new_tokens, steps, threads, seed, work_dir, lora) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    set_seed(seed)
    path = str(Path(policy_dir))

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # TRL's generate() wants left-padded queries

    def load(cls, **kw):
        model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    policy = load(AutoModelForCausalLM)
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora)
    ref_policy = None if peft_config else load(AutoModelForCausalLM)
    reward_model = load(AutoModelForSequenceClassification, num_labels=1)
    value_model = load(AutoModelForSequenceClassification, num_labels=1)

    rollouts = steps * batch_size
    cycled = [prompts[i % len(prompts)] for i in range(rollouts)]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in cycled]})

    args = PPOConfig(
        output_dir=work_dir,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # (transformers 5 name of gradient_checkpointing)
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        total_episodes=rollouts,  # -> exactly `steps` updates
        local_rollout_forward_batch_size=batch_size,
        response_length=max_new_tokens,
        temperature=1.0,
        stop_token="eos",
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class Timer(TrainerCallback):
        start = end = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    step_ends: list[float] = []
    timer = Timer()
    with _quiet_trl_warnings():
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            train_dataset=dataset,
            value_model=value_model,
            callbacks=[timer],
            peft_config=peft_config,
        )

    step_tokens: list[int] = []  # one batch_generation call per step (whole batch at once)
    original = ppo_module.batch_generation

    def counting_batch_generation(model, queries, *a, **kw):
        query_responses, logits = original(model, queries, *a, **kw)
        step_tokens.append(_count_generated(query_responses[:, queries.shape[1] :], trainer.stop_token_id))
        return query_responses, logits

    ppo_module.batch_generation = counting_batch_generation
    try:
        # TRL prints every step's metric dict; keep the caller's stdout clean.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), _quiet_trl_warnings():
            trainer.train()
    finally:
        ppo_module.batch_generation = original

    seconds = timer.end - timer.start
    generated = sum(step_tokens)
    marks = [timer.start, *step_ends]
    return {
        "tokens_per_second": generated / seconds,
        "seconds": seconds,
        "steps": trainer.state.global_step,
        "generated_tokens": generated,
        "rollouts": rollouts,
        "step_seconds": [b - a for a, b in zip(marks, marks[1:])],
        "step_tokens": step_tokens,
        "trl_version": trl.__version__,
        "algorithm": ALGORITHM,
        "threads": threads,
        "lora": lora,
    }


if __name__ == "__main__":  # quick manual check: python -m jobs.drivers.trl_baseline POLICY_DIR
    import json
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        result = trl_tokens_per_second(
            sys.argv[1],
            ["Write a short review of the movie.", "What did you think of the ending?"],
            batch_size=4,
            max_new_tokens=16,
            steps=2,
            threads=2,
            seed=0,
            work_dir=tmp,
        )
    print(json.dumps(result, indent=2))
