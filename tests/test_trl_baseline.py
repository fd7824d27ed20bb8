"""The TRL PPO baseline runs on a tiny random policy (needs the optional ``bench`` extra)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import toy_texts
from uprlhf.models import save_tiny_policy


def test_count_generated_stops_at_first_eos():
    from jobs.drivers.trl_baseline import _count_generated

    responses = torch.tensor([[5, 9, 0, 0], [7, 8, 6, 9], [9, 0, 0, 0], [1, 2, 3, 4]])
    assert _count_generated(responses, 9) == 2 + 4 + 1 + 4
    assert _count_generated(responses, None) == 16


@pytest.mark.slow
def test_trl_ppo_one_step_on_tiny_policy(tmp_path):
    pytest.importorskip("trl")
    from jobs.drivers.trl_baseline import trl_tokens_per_second

    policy = save_tiny_policy(tmp_path / "policy", toy_texts())
    batch, new_tokens = 4, 6
    result = trl_tokens_per_second(
        str(policy),
        toy_texts()[:3],  # fewer prompts than rollouts: they are cycled
        batch_size=batch,
        max_new_tokens=new_tokens,
        steps=1,
        threads=1,
        seed=0,
        work_dir=str(tmp_path / "work"),
    )
    assert result["algorithm"] == "ppo"
    assert result["steps"] == 1 and result["rollouts"] == batch
    assert 0 < result["generated_tokens"] <= batch * new_tokens
    assert result["tokens_per_second"] > 0
    assert result["tokens_per_second"] == pytest.approx(result["generated_tokens"] / result["seconds"])
    assert len(result["step_seconds"]) == 1 and result["step_tokens"] == [result["generated_tokens"]]
    assert not any((tmp_path / "work").glob("checkpoint-*"))


@pytest.mark.slow
def test_trl_ppo_trains_only_the_given_lora_on_tiny_policy(tmp_path, monkeypatch):
    """The like-for-like side: TRL's PPO with our adapter's rank, alpha and targets, no reference copy loaded."""
    pytest.importorskip("trl")
    from trl.experimental.ppo import ppo_trainer

    from jobs.drivers.trl_baseline import trl_tokens_per_second

    seen = {}
    original_init = ppo_trainer.PPOTrainer.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        seen["ref_model"] = kwargs["ref_model"]
        seen["trainable"] = sorted({n.split(".")[-3] for n, p in self.policy_model.named_parameters() if p.requires_grad})
        seen["rank"] = self.policy_model.peft_config["default"].r

    monkeypatch.setattr(ppo_trainer.PPOTrainer, "__init__", recording_init)
    policy = save_tiny_policy(tmp_path / "policy", toy_texts())
    lora = {"r": 2, "lora_alpha": 4.0, "target_modules": ["q_proj", "v_proj"]}
    result = trl_tokens_per_second(
        str(policy), toy_texts()[:3], batch_size=4, max_new_tokens=4, steps=1, threads=1, seed=0,
        work_dir=str(tmp_path / "work"), lora=lora,
    )
    assert result["lora"] == lora and result["steps"] == 1 and result["tokens_per_second"] > 0
    assert seen == {"ref_model": None, "trainable": ["lora_A", "lora_B"], "rank": 2}
