"""The state of one RL run that a checkpoint holds besides the learner's weights and optimiser.

One object owns it all (step, policy and ensemble versions, the running mean ū of the
uncertainty, the adaptive KL controller, the hacking alarm, how far the selector has
read the replay buffer, failed selection rounds), so a checkpoint is ``state.save(dir)``
and a resume is ``state.restore(dir)``, with nothing copied in by hand before saving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from uprlhf.atomic import atomic_write
from uprlhf.config import AlarmConfig, KLConfig
from uprlhf.rl.alarm import HackingAlarm
from uprlhf.rl.ppo import AdaptiveKLController, RunningMean

STATE_FILE = "state.json"


@dataclass
class RunState:
    """Everything of a run's progress that is not a tensor; saved atomically as one JSON file."""

    ensemble_checkpoint: str  # the ensemble the scorer holds (a refined version once one is published)
    running_uncertainty: RunningMean
    kl_controller: AdaptiveKLController
    alarm: HackingAlarm
    step: int = -1  # last completed step
    policy_version: int = 0
    ensemble_version: int = 0
    selected_through: int = -1  # last step whose replay rows a finished selection round has seen
    failed_selections: int = 0  # selection rounds that failed (a dead selector), counted, never silent
    failed_selection_steps: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, ensemble_checkpoint: str, kl: KLConfig, alarm: AlarmConfig) -> RunState:
        """The state of a run before its first step."""
        return cls(
            ensemble_checkpoint=ensemble_checkpoint,
            running_uncertainty=RunningMean(),
            kl_controller=AdaptiveKLController(kl.coef, kl.target, kl.horizon),
            alarm=HackingAlarm(alarm),
        )

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "policy_version": self.policy_version,
            "ensemble_version": self.ensemble_version,
            "ensemble_checkpoint": self.ensemble_checkpoint,
            "selected_through": self.selected_through,
            "failed_selections": self.failed_selections,
            "failed_selection_steps": list(self.failed_selection_steps),
            "running_uncertainty": self.running_uncertainty.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "alarm": self.alarm.state_dict(),
        }

    def save(self, folder: Path) -> Path:
        """Write ``folder/state.json`` atomically."""
        text = json.dumps(self.state_dict(), indent=2, sort_keys=True) + "\n"
        return atomic_write(Path(folder) / STATE_FILE, lambda handle: handle.write(text), binary=False)

    def restore(self, folder: Path) -> None:
        """Take over the state saved in ``folder`` (in place, so everything holding this object sees it)."""
        saved = json.loads((Path(folder) / STATE_FILE).read_text())
        self.running_uncertainty.load_state_dict(saved["running_uncertainty"])
        self.kl_controller.load_state_dict(saved["kl_controller"])
        self.alarm.load_state_dict(saved["alarm"])
        for key in ("step", "policy_version", "ensemble_version", "ensemble_checkpoint", "selected_through",
                    "failed_selections", "failed_selection_steps"):
            if key in saved:
                setattr(self, key, saved[key])
