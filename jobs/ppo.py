"""Step 3: PPO against a reward ensemble, its uncertainty shaped into the reward by a named penalty.

    python -m jobs.ppo --config jobs/configs/ppo.yaml --output-dir DIR [penalty.name=up_rlhf ...]

The run (``jobs.drivers.ppo.run_ppo``) reads placement plan → role groups → resume →
one trainer step per PPO step: R rollout workers, the reward scorer (ensemble +
reference policy), W DeepSpeed learner ranks and, with ``selector.strategy`` set,
the selector, in one placement group; a zero-CPU replay buffer. Started again on the
same DIR, it resumes from the last checkpoint; a rollout worker, scorer or replay
buffer that dies is replaced and its call retried.
"""

from __future__ import annotations

from jobs.common import exit_on_error, log, parse
from jobs.drivers.ppo import run_ppo
from uprlhf.config import RLConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(RLConfig, __doc__, argv)
    with exit_on_error():
        summary = run_ppo(cfg, out)
    log.info("done: gold %s, KL %.3f; %s", summary["gold_final"], summary["kl_final"], out / "summary.json")


if __name__ == "__main__":
    main()
