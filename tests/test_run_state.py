"""The run state saves and restores everything a resumed run needs, in one atomic file."""

import json

import pytest
import torch

from uprlhf.config import AlarmConfig, KLConfig
from uprlhf.rl.run_state import STATE_FILE, RunState


def test_state_round_trips_through_its_file(tmp_path):
    kl, alarm = KLConfig(coef=0.1, target=1.0), AlarmConfig(warmup_steps=2, band_window=2, trend_window=2)
    state = RunState.start("ck/v0", kl, alarm)
    state.running_uncertainty.update(torch.tensor([0.1, 0.3]))
    state.kl_controller.update(4.0, 8)
    for step in range(3):
        state.alarm.update(step, 0.1 * step, 0.2 * step)
    state.step, state.policy_version, state.ensemble_version, state.ensemble_checkpoint = 2, 3, 1, "ck/v1"
    state.selected_through, state.failed_selections, state.failed_selection_steps = 1, 1, [2]
    state.save(tmp_path)

    restored = RunState.start("ignored", kl, alarm)
    restored.restore(tmp_path)
    assert restored.state_dict() == state.state_dict()
    assert restored.running_uncertainty.value == state.running_uncertainty.value == pytest.approx(0.2)
    assert restored.kl_controller.coef == state.kl_controller.coef != 0.1
    assert json.loads((tmp_path / STATE_FILE).read_text())["ensemble_checkpoint"] == "ck/v1"
    assert not [p for p in tmp_path.iterdir() if p.name != STATE_FILE]  # no temp file left behind
