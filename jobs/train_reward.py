"""Step 2: train a reward ensemble of each configured kind with Ray Train + DeepSpeed, then evaluate.

    python -m jobs.train_reward --config jobs/configs/train_reward.yaml --output-dir DIR

Placement: per kind, one Ray Train ``TorchTrainer`` of ``train.num_workers`` DeepSpeed
ranks (gloo on CPU, NCCL on GPU). The loop: train → copy its checkpoints to
``DIR/checkpoints/<kind>/`` → evaluate on held-out pairs and OOD responses → add
``kinds.<kind>`` to ``summary.json``. A kind already finished in DIR is skipped,
so a killed run resumes at the kind it was training.
"""

from __future__ import annotations

from jobs.common import exit_on_error, parse, write_config
from jobs.drivers.train_reward import run_train_reward
from uprlhf.config import TrainRewardConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(TrainRewardConfig, __doc__, argv)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    with exit_on_error():
        run_train_reward(cfg, out)


if __name__ == "__main__":
    main()
