import math
import os

import pytest
import torch

from tests.conftest import tiny_rl_tree
from uprlhf.config import RLConfig, build
from uprlhf.rl.estimators import group_ids, repeat_prompts
from uprlhf.rl.learner import LearnerBatch, PPOLearner
from uprlhf.rl.rollout import HFRolloutEngine


def make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **overrides) -> RLConfig:
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"learner.num_workers": 1, **overrides})
    return build(RLConfig, tree)


def batch_for(cfg: RLConfig, rewards: list[float]) -> LearnerBatch:
    """Samples of len(rewards) / n prompts, each n = ppo.samples_per_prompt times in a row, as the driver draws them."""
    n = cfg.ppo.samples_per_prompt
    prompts = repeat_prompts(["the movie was", "this film is", "the plot felt", "the acting was"][: len(rewards) // n], n)
    sampled = HFRolloutEngine(cfg.policy, cfg.rollout).generate(prompts, seed=0)
    return LearnerBatch(sampled, sampled.logprobs.clone(), torch.tensor(rewards), group_ids(len(rewards), n))


def test_a_ppo_step_raises_the_likelihood_of_rewarded_samples(single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts):
    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"ppo.epochs": 4, "ppo.lr": 1e-2})
    learner = PPOLearner(cfg, 0, 1)
    batch = batch_for(cfg, [1.0, -1.0, 1.0, -1.0])
    stats = learner.train(batch, step=0, kl_coef=0.0)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-4)  # the first step starts at the reference
    assert stats["response_tokens"] == float(batch.sampled.response_mask.sum())
    with torch.no_grad():
        logp, _ = learner.model(batch.sampled, 1.0)
    gain = (logp - batch.sampled.logprobs).sum(1)
    assert gain[0] > gain[1] and gain[2] > gain[3]
    weights = learner.policy_weights()
    assert weights and all("lora_" in k for k in weights)


def test_kl_in_the_loss_for_up_rlhf_and_in_the_reward_otherwise(tiny_policy, tiny_reward_checkpoint, tiny_prompts):
    assert make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"penalty.name": "up_rlhf"}).kl_in_loss()
    assert not make(tiny_policy, tiny_reward_checkpoint, tiny_prompts).kl_in_loss()
    assert make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"kl.placement": "loss"}).kl_in_loss()


def _shifted(batch: LearnerBatch) -> LearnerBatch:
    """The batch with a reference 0.5 nats below the sampler on every token: log π/π_ref = 0.5 per token."""
    return LearnerBatch(batch.sampled, batch.ref_logprobs - 0.5, batch.rewards, batch.groups)


@pytest.mark.parametrize("penalty, kl_in_reward", [("mean", True), ("var_kl", False)])
def test_var_kl_replaces_the_per_token_kl_in_the_reward(penalty, kl_in_reward, single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts):
    from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS
    from uprlhf.rl.ppo import masked_mean, token_rewards

    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"penalty.name": penalty})
    learner = PPOLearner(cfg, 0, 1)
    batch = _shifted(batch_for(cfg, [1.0, -1.0, 0.5, 0.0]))
    mask = batch.sampled.response_mask.float()
    with torch.no_grad():
        old_logp, values = learner.model(batch.sampled, cfg.rollout.temperature)

    def mean_return(kl_coef: float) -> float:
        rewards = token_rewards(batch.rewards, kl_coef * (old_logp - batch.ref_logprobs) * mask, mask)
        _, returns = ADVANTAGE_ESTIMATORS.get(cfg.ppo.estimator)(rewards, values, mask, batch.groups, cfg.ppo)
        return float(masked_mean(returns, mask))

    assert mean_return(1.0) < mean_return(0.0) - 0.4  # 0.5 nats a token at coefficient 1 is visible
    stats = learner.train(batch, step=0, kl_coef=1.0)
    assert stats["return_mean"] == pytest.approx(mean_return(1.0 if kl_in_reward else 0.0), rel=1e-5)
    assert "kl_loss" not in stats


@pytest.mark.parametrize("form", ["sequence_sq", "per_token"])
def test_kl_loss_of_the_learner_is_the_configured_form(form, single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts):
    """At a learning rate too small to move the policy, the KL loss is the hand value of the shifted reference."""
    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts,
               **{"penalty.name": "up_rlhf", "kl.loss_form": form, "ppo.lr": 1e-12, "ppo.epochs": 1})
    batch = _shifted(batch_for(cfg, [1.0, -1.0, 0.5, 0.0]))
    lengths = batch.sampled.response_mask.sum(1).double()
    # Eq. 15: mean over samples of (Σ_t 0.5)² = (0.5·length)²; per token: k2 = ½·0.5² on every token
    expected = float((0.5 * lengths).square().mean()) if form == "sequence_sq" else 0.125
    stats = PPOLearner(cfg, 0, 1).train(batch, step=0, kl_coef=0.1)
    assert stats["kl_loss"] == pytest.approx(expected, rel=1e-3)


def test_kl_loss_is_reported_when_kl_is_in_the_loss(single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts):
    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"penalty.name": "up_rlhf"})
    stats = PPOLearner(cfg, 0, 1).train(batch_for(cfg, [1.0, 0.0, 0.0, 1.0]), step=0, kl_coef=0.1)
    assert "kl_loss" in stats and stats["kl_loss"] >= 0


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_baseline"])
def test_a_critic_free_step_trains_no_value_head_and_reports_the_group_spread(estimator, single_rank, tiny_policy,
                                                                               tiny_reward_checkpoint, tiny_prompts):
    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts,
               **{"ppo.estimator": estimator, "ppo.samples_per_prompt": 2, "ppo.epochs": 4, "ppo.lr": 1e-2})
    batch = batch_for(cfg, [1.0, -1.0, 0.5, 0.0])
    assert batch.sampled.prompts == ["the movie was"] * 2 + ["this film is"] * 2
    learner = PPOLearner(cfg, 0, 1)
    assert not any(p.requires_grad for p in learner.model.value_head.parameters())
    stats = learner.train(batch, step=0, kl_coef=0.0)
    assert not {"value_loss", "value_mean", "explained_variance"} & set(stats)
    # R = the shaped rewards (no KL at coefficient 0): groups [1, −1] and [0.5, 0], sample stds √2 and √0.125
    assert stats["group_reward_std"] == pytest.approx((math.sqrt(2) + math.sqrt(0.125)) / 2, rel=1e-5)
    assert all(not p.any() for p in learner.model.value_head.parameters())  # still as built
    with torch.no_grad():
        logp, _ = learner.model(batch.sampled, 1.0)
    gain = (logp - batch.sampled.logprobs).sum(1)
    assert gain[0] > gain[1] and gain[2] > gain[3]  # within each prompt, the better sample gained


def _hand_diagnostics(learner: PPOLearner, batch: LearnerBatch, kl_coef: float) -> dict:
    """Entropy, explained variance and longest response of the policy before a step, recomputed by hand."""
    from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS
    from uprlhf.rl.ppo import token_rewards

    cfg, sampled = learner.cfg, batch.sampled
    mask = sampled.response_mask.float()
    ids, attn = sampled.sequences()
    p, t = sampled.prompt_ids.shape[1], sampled.response_ids.shape[1]
    with torch.no_grad():
        logits = learner.model.policy(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
        dist = torch.distributions.Categorical(logits=logits[:, p - 1 : p - 1 + t].float() / cfg.rollout.temperature)
        entropy = float((dist.entropy() * mask).sum() / mask.sum())
        old_logp, values = learner.model(sampled, cfg.rollout.temperature)
        rewards = token_rewards(batch.rewards, kl_coef * (old_logp - batch.ref_logprobs) * mask, mask)
        _, returns = ADVANTAGE_ESTIMATORS.get(cfg.ppo.estimator)(rewards, values, mask, batch.groups, cfg.ppo)
    r, v = returns[mask.bool()].double(), values[mask.bool()].double()
    return {
        "entropy": entropy,
        "explained_variance": float(1 - (r - v).var(unbiased=False) / r.var(unbiased=False)),
        "response_length_max": float(max(int(m.sum()) for m in sampled.response_mask)),
    }


def test_training_diagnostics_match_hand_computations(single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts):
    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"ppo.epochs": 2, "ppo.lr": 1e-2})
    learner = PPOLearner(cfg, 0, 1)
    batch = batch_for(cfg, [1.0, -1.0, 0.5, 0.0])
    norms = []
    real_step = learner.engine.step

    def step(*args, **kwargs):  # the global gradient norm each update sees, before DeepSpeed clips it
        norms.append(float(torch.nn.utils.get_total_norm([q.grad for q in learner.model.parameters() if q.grad is not None])))
        return real_step(*args, **kwargs)

    learner.engine.step = step
    for n in range(2):  # the first step has a zero value head (explained variance 0), the second a trained one
        expected = _hand_diagnostics(learner, batch, 0.05)
        del norms[:]
        stats = learner.train(batch, step=n, kl_coef=0.05)
        assert set(stats) == {"policy_loss", "value_loss", "clip_fraction", "approx_kl", "grad_norm", "kl", "value_mean",
                              "return_mean", "entropy", "explained_variance", "response_tokens", "response_length_max",
                              "train_seconds"}
        assert stats["entropy"] == pytest.approx(expected["entropy"], rel=1e-5)
        assert stats["explained_variance"] == pytest.approx(expected["explained_variance"], rel=1e-4, abs=1e-6)
        assert stats["response_length_max"] == expected["response_length_max"]
        assert len(norms) == 2 * len(batch) // learner.micro_batch
        assert stats["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    assert expected["explained_variance"] != 0.0 and 0 < stats["entropy"] < math.log(learner.model.policy.config.vocab_size)
    learner.engine.step = real_step


def test_grad_norm_under_zero_is_the_optimizers_own(single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts):
    """ZeRO 2 keeps no gradients on the parameters; its norm (DeepSpeed's) matches stage 0's for the same run."""
    runs = {}
    for stage in (0, 2):
        cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"learner.zero_stage": stage, "ppo.lr": 1e-2})
        runs[stage] = PPOLearner(cfg, 0, 1).train(batch_for(cfg, [1.0, -1.0, 0.5, 0.0]), step=0, kl_coef=0.05)["grad_norm"]
    assert runs[0] > 0 and runs[2] == pytest.approx(runs[0], rel=1e-4)


def _comparable(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "train_seconds"}


def _optimizer_tensors(learner: PPOLearner) -> dict[str, torch.Tensor]:
    from uprlhf.checkpoint import flatten_state

    return flatten_state(learner.state_dict())[0]


@pytest.mark.parametrize("zero_stage, estimator, n", [(0, "gae", 1), (1, "gae", 1), (2, "gae", 1), (3, "gae", 1), (3, "grpo", 2)])
def test_save_and_load_resume_bit_identically(zero_stage, estimator, n, single_rank, tiny_policy, tiny_reward_checkpoint,
                                              tiny_prompts, tmp_path):
    """Train, save, go on; a fresh learner loading the save gives exactly the same next steps (a frozen value head too)."""
    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts,
               **{"learner.zero_stage": zero_stage, "ppo.lr": 1e-2, "ppo.estimator": estimator, "ppo.samples_per_prompt": n})
    learner = PPOLearner(cfg, 0, 1)
    batch = batch_for(cfg, [1.0, -1.0, 0.5, 0.0])
    learner.train(batch, step=0, kl_coef=0.05)
    learner.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "policy" / "adapter_model.safetensors").exists()
    assert {p.name for p in (tmp_path / "ckpt" / "learner").iterdir()} == {"rank_0.safetensors", "rank_0.json"}
    assert not list((tmp_path / "ckpt").rglob("*.pt")) and not list((tmp_path / "ckpt").rglob("*.bin"))
    expected = [_comparable(learner.train(batch, step=step, kl_coef=0.05)) for step in (1, 2)]  # uninterrupted
    torch.manual_seed(1234)  # the RNG has moved on; the loaded one must be the saved one
    resumed = PPOLearner(cfg, 0, 1)
    resumed.load(tmp_path / "ckpt")
    assert [_comparable(resumed.train(batch, step=step, kl_coef=0.05)) for step in (1, 2)] == expected
    mine, theirs = _optimizer_tensors(learner), _optimizer_tensors(resumed)
    assert set(mine) == set(theirs)
    for key, tensor in mine.items():
        if not key.startswith("rng."):
            assert torch.equal(tensor, theirs[key]), key
    assert any("exp_avg_sq" in key for key in mine)
    for k, v in learner.policy_weights().items():
        assert torch.equal(v, resumed.policy_weights()[k])


def test_load_refuses_a_state_saved_with_another_world_size(single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    from uprlhf.checkpoint import load_state, save_state

    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts)
    learner = PPOLearner(cfg, 0, 1)
    learner.save(tmp_path / "ckpt")
    stem = tmp_path / "ckpt" / "learner" / "rank_0"
    state = load_state(stem)
    state["world_size"] = 2
    save_state(stem, state)
    with pytest.raises(ValueError, match="world_size=2"):
        learner.load(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="rank 0"):
        learner.load(tmp_path / "nowhere")


class _Planted:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_checkpoint_is_never_executed(single_rank, tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    import pickle

    cfg = make(tiny_policy, tiny_reward_checkpoint, tiny_prompts)
    learner = PPOLearner(cfg, 0, 1)
    learner.save(tmp_path / "ckpt")
    marker = tmp_path / "EXECUTED"
    payload = pickle.dumps({"module": _Planted(str(marker))})
    for name in ("learner/mp_rank_00_model_states.pt", "learner/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "learner/rank_0.pt", "mp_rank_00_model_states.pt", "policy/adapter_model.bin", "policy/pytorch_model.bin"):
        (tmp_path / "ckpt" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ckpt" / name).write_bytes(payload)
    (tmp_path / "ckpt" / "latest").write_text("learner")  # what DeepSpeed's loader would follow
    pickle.loads(pickle.dumps(_Planted(str(tmp_path / "probe"))))  # the payload does work when unpickled
    assert (tmp_path / "probe").exists()
    PPOLearner(cfg, 0, 1).load(tmp_path / "ckpt")
    assert not marker.exists()


def test_nothing_in_the_library_unpickles():
    """No torch.load without weights_only=True, no pickle loads, no DeepSpeed (pickled) checkpoints."""
    import re
    from pathlib import Path

    import uprlhf

    root = Path(uprlhf.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\s*\(", text):
            call = text[match.start() : text.find(")", match.end()) + 1]
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.relative_to(root)}: {call}")
        for pattern in (r"\bpickle\.loads?\s*\(", r"\bdill\.", r"\bload_checkpoint\s*\(", r"\bsave_checkpoint\s*\(",
                        r"weights_only\s*=\s*False", r"\bjoblib\.load\s*\("):
            offenders += [f"{path.relative_to(root)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_learner_on_gpu_with_nccl_and_zero(zero_stage, tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    """One NCCL rank in a subprocess (this process may hold a gloo group): train, gather weights, save, load."""
    import json
    import subprocess
    import sys
    import textwrap

    from tests.conftest import tiny_rl_tree

    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{
        "learner.num_workers": 1, "learner.use_gpu": True, "learner.zero_stage": zero_stage, "rollout.gpus_per_worker": 1,
    })
    script = textwrap.dedent(f"""
        import json, os, torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl")
        from uprlhf.config import RLConfig, build
        from uprlhf.rl.estimators import group_ids
        from uprlhf.rl.learner import LearnerBatch, PPOLearner
        from uprlhf.rl.rollout import HFRolloutEngine
        cfg = build(RLConfig, json.loads({json.dumps(json.dumps(tree))}))
        engine = HFRolloutEngine(cfg.policy, cfg.rollout)
        assert engine.device.type == "cuda"
        batch = engine.generate(["the movie was", "this film is"], seed=0)
        learner = PPOLearner(cfg, 0, 1)
        stats = learner.train(LearnerBatch(batch, batch.logprobs.clone(), torch.tensor([1.0, -1.0]), group_ids(2, 1)), 0, 0.05)
        weights = learner.policy_weights()
        engine.load_weights(weights, 1)
        learner.save("{tmp_path}/ckpt")
        learner.load("{tmp_path}/ckpt")
        print("OK", stats["kl"], len(weights), next(iter(weights.values())).device)
    """)
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout and "cpu" in done.stdout
