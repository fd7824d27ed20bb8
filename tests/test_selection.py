import json

import pytest
import torch
from scipy.stats import spearmanr
from transformers import AutoTokenizer

from tests.conftest import BAD, GOOD, OPENINGS, toy_pairs
from tests.test_reward_training import PlainEngine
from uprlhf.config import EnsembleConfig, ModelConfig, TrainConfig
from uprlhf.ensembles import RewardEnsemble, ensemble_class
from uprlhf.reward_training import train_ensemble
from uprlhf.selection import influence_scores, quantile_targets
from uprlhf.selection.influence import (
    InfluenceCheckpoint,
    InfluenceRanker,
    RademacherProjector,
    checkpoint_features,
)


@pytest.fixture(scope="module")
def lora_checkpoints(tiny_reward_backbone, tmp_path_factory):
    """Two checkpoints of a tiny trained 3-member LoRA ensemble, as jobs.train_reward lays them out."""
    root = tmp_path_factory.mktemp("lora_ckpts")
    tok = AutoTokenizer.from_pretrained(tiny_reward_backbone)
    ensemble = ensemble_class("lora")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=3, lora_rank=4), 3e-3, 3e-2, 0)
    paths = []

    def save(checkpoint):
        path = root / f"ckpt_{len(paths)}"
        info = checkpoint.write(path)
        (path / "trainer_state.json").write_text(json.dumps(info))
        paths.append(path)

    train_ensemble(
        ensemble, tok, toy_pairs(64), TrainConfig(batch_size=16, epochs=2, checkpoints=2, max_length=24),
        warmup_fraction=0.3, bootstrap=False, rank=0, world_size=1, make_engine=PlainEngine, on_checkpoint=save,
    )
    return paths, tok


def _candidates(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Responses of 1-6 words drawn from praise, complaints and filler: their influences spread out."""
    gen = torch.Generator().manual_seed(seed)
    words = GOOD + BAD + ["zz", "qq", "xx", "and", "really"]
    prompts, responses = [], []
    for i in range(n):
        length = int(torch.randint(1, 7, (1,), generator=gen))
        picks = torch.randint(len(words), (length,), generator=gen).tolist()
        prompts.append(OPENINGS[i % len(OPENINGS)])
        responses.append(" ".join(words[j] for j in picks))
    return prompts, responses


def test_quantile_targets_match_hand_computed_quintiles():
    rewards = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [3.0, 40.0], [4.0, 50.0]])
    targets = quantile_targets(torch.tensor([1, 3, 5, 2, 4]), rewards, noise_std=0.0)
    # quantile q of 0..4 with linear interpolation is 4q; of 10..50 it is 10 + 40q.
    expected = torch.tensor([[0.8, 18.0], [2.4, 34.0], [4.0, 50.0], [1.6, 26.0], [3.2, 42.0]])
    assert torch.allclose(targets, expected)


def test_quantile_targets_use_the_reference_distribution_when_given():
    reference = torch.arange(11.0).repeat(2, 1).T  # 0..10 for both members
    targets = quantile_targets(torch.tensor([5, 1]), torch.zeros(2, 2), noise_std=0.0, reference=reference)
    assert torch.allclose(targets, torch.tensor([[10.0, 10.0], [2.0, 2.0]]))


def test_quantile_targets_noise_has_the_requested_spread():
    rewards = torch.randn(2000, 3)
    labels = torch.full((2000,), 3)
    exact = quantile_targets(labels, rewards, noise_std=0.0)
    noisy = quantile_targets(labels, rewards, noise_std=0.5, generator=torch.Generator().manual_seed(0))
    assert (noisy - exact).std().item() == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("labels", [[0, 3], [3, 6], [2.5, 3]])
def test_quantile_targets_reject_labels_outside_one_to_five(labels):
    with pytest.raises(ValueError, match="1..5"):
        quantile_targets(torch.tensor(labels), torch.zeros(2, 2), noise_std=0.0)


def test_influence_scores_follow_the_definition_on_hand_made_gradients():
    train = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # [C=2, N=3, d=2]
    val = {"a": torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [0.0, 1.0]]]), "b": torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])}
    lr = torch.tensor([1.0, 0.5])
    # subtask a: mean val grads (1, 0) then (0, 2); b: (0, 1) twice.
    a = torch.tensor([1 * 1 + 0.5 * 0, 1 * 0 + 0.5 * 1, 1 * 2**-0.5 + 0.5 * 0])
    b = torch.tensor([1 * 0 + 0.5 * 0, 1 * 1 + 0.5 * 1, 1 * 2**-0.5 + 0.5 * 0])
    assert torch.allclose(influence_scores(train, val, lr), torch.maximum(a, b))


def test_influence_scores_check_shapes():
    with pytest.raises(ValueError, match="lr_weights"):
        influence_scores(torch.zeros(2, 3, 4), {"a": torch.zeros(2, 1, 4)}, torch.ones(3))
    with pytest.raises(ValueError, match="subtask 'a'"):
        influence_scores(torch.zeros(2, 3, 4), {"a": torch.zeros(2, 1, 5)}, torch.ones(2))


def test_projection_is_seeded_and_keeps_inner_products():
    x = torch.randn(4, 3000)
    p = RademacherProjector(3000, 2048, seed=3, block_rows=700)
    assert torch.equal(p.project(x), RademacherProjector(3000, 2048, seed=3, block_rows=700).project(x))
    assert not torch.equal(p.project(x), RademacherProjector(3000, 2048, seed=4, block_rows=700).project(x))
    exact, projected = x @ x.T, p.project(x) @ p.project(x).T
    assert torch.allclose(projected, exact, atol=0.15 * exact.diagonal().mean().item())


def test_lora_ensemble_differentiates_only_member_lora_matrices(lora_checkpoints):
    ensemble = RewardEnsemble.load(lora_checkpoints[0][-1])
    names = [n for n, _ in ensemble.refinable_parameters()]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".lora_")[1].split(".")[1] for n in names} == {"m0", "m1", "m2"}


def test_linear_ensemble_differentiates_its_heads(tiny_reward_checkpoint):
    ensemble = RewardEnsemble.load(tiny_reward_checkpoint)
    assert [n for n, _ in ensemble.refinable_parameters()] == ["model.classifier.weight", "model.classifier.bias"]


def test_checkpoint_loads_mean_lr_and_moments_in_parameter_order(lora_checkpoints):
    paths, _ = lora_checkpoints
    first, second = InfluenceCheckpoint.load(paths[0]), InfluenceCheckpoint.load(paths[1])
    assert first.mean_lr > second.mean_lr > 0
    size = sum(p.numel() for _, p in first.ensemble.refinable_parameters())
    assert first.exp_avg.shape == first.exp_avg_sq.shape == (size,)
    assert (first.exp_avg_sq >= 0).all() and first.exp_avg_sq.sum() > 0


def test_projected_influence_ranks_like_exact_influence_at_the_default_dimension(lora_checkpoints):
    from uprlhf.config import SelectorConfig

    paths, tok = lora_checkpoints
    checkpoints = [InfluenceCheckpoint.load(p) for p in paths]
    prompts, responses = _candidates(40)
    val = {"pos": ([r["prompt"] for r in toy_pairs(8, 1)], [r["chosen"] for r in toy_pairs(8, 1)]),
           "neg": ([r["prompt"] for r in toy_pairs(8, 2)], [r["rejected"] for r in toy_pairs(8, 2)])}
    size = sum(p.numel() for _, p in checkpoints[0].ensemble.refinable_parameters())
    lr = torch.tensor([c.mean_lr for c in checkpoints])

    def scores(projector):
        train = torch.stack([checkpoint_features(c, tok, prompts, responses, projector, max_length=24, adam_eps=1e-8) for c in checkpoints])
        vals = {k: torch.stack([checkpoint_features(c, tok, *v, projector, max_length=24, adam_eps=None) for c in checkpoints]) for k, v in val.items()}
        return influence_scores(train, vals, lr)

    class Identity:
        dim = size

        def project(self, grads):
            return grads

    exact = scores(Identity())
    projected = scores(RademacherProjector(size, SelectorConfig().projection_dim, seed=0))
    assert spearmanr(exact.numpy(), projected.numpy()).statistic >= 0.9


def test_ranker_scores_validation_like_samples_highest(lora_checkpoints):
    paths, tok = lora_checkpoints
    val_pairs = toy_pairs(16, 3)
    ranker = InfluenceRanker(paths, tok, {"default": ([r["prompt"] for r in val_pairs], [r["chosen"] for r in val_pairs])},
                             dim=256, seed=0, adam_eps=1e-8, max_length=24)
    scores = ranker.scores(["the movie was"] * 2, ["great and lovely", "zz qq xx"])
    assert scores.shape == (2,) and ranker.adam_normalized
    assert scores[0] > scores[1]
