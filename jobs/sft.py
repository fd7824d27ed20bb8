"""Step 1: supervised fine-tuning of the policy, the π_SFT that RL starts from and regularises towards.

    python -m jobs.sft --config jobs/configs/sft.yaml --output-dir DIR [policy.lora_rank=null ...]

The run (``jobs.drivers.sft.run_sft``) reads placement plan → learner group → resume →
one optimiser step per loop turn: W DeepSpeed ranks train on the response tokens of
the gold-best completion per SFT prompt (``jobs.prepare_data`` with
``sft_completions_per_prompt`` >= 1) or of any prompt/response file. It writes
``DIR/policy`` (merged Hugging Face model, safetensors) and ``DIR/adapter`` (PEFT, LoRA
runs); pass ``policy.model.name_or_path=DIR/policy`` to the RL jobs. Started again on
the same DIR, it resumes from the last checkpoint.
"""

from __future__ import annotations

from jobs.common import exit_on_error, parse
from jobs.drivers.sft import run_sft
from uprlhf.sft.config import SFTConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(SFTConfig, __doc__, argv)
    out.mkdir(parents=True, exist_ok=True)
    with exit_on_error():
        run_sft(cfg, out)


if __name__ == "__main__":
    main()
