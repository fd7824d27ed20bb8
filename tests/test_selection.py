import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from transformers import AutoTokenizer

from tests.conftest import BAD, GOOD, OPENINGS, PlainEngine, toy_pairs
from uprlhf.config import EnsembleConfig, ModelConfig, TrainConfig
from uprlhf.reward.ensembles import RewardEnsemble, ensemble_class
from uprlhf.reward.losses import mse_refinement_loss
from uprlhf.reward.training import train_ensemble
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
    torch.manual_seed(0)  # LoRA A draws from the global generator: the same ensemble whatever ran before
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
    a = torch.tensor([1 * 1 + 0.5 * 0, 1 * 0 + 0.5 * 1, 1 * 2**-0.5 + 0.5 * 0])  # (1, 0.5, 0.7071)
    b = torch.tensor([1 * 0 + 0.5 * 0, 1 * 1 + 0.5 * 1, 1 * 2**-0.5 + 0.5 * 0])  # (0, 1.5, 0.7071)
    assert torch.allclose(influence_scores(train, val, lr), torch.tensor([0.5, 1.0, 2**-0.5]))  # the mean, by default
    assert torch.allclose(influence_scores(train, val, lr, "mean"), (a + b) / 2)
    assert torch.allclose(influence_scores(train, val, lr, "max"), torch.tensor([1.0, 1.5, 2**-0.5]))
    assert torch.equal(influence_scores(train, {"a": val["a"]}, lr, "max"), influence_scores(train, {"a": val["a"]}, lr, "mean"))


def test_influence_scores_refuse_an_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown subtask aggregation 'sum'; allowed: 'mean', 'max'"):
        influence_scores(torch.zeros(1, 2, 3), {"a": torch.zeros(1, 1, 3)}, torch.ones(1), "sum")


class LinearHeads(torch.nn.Module):
    """K linear reward heads on fixed features, r_k(x) = w_k·x + b_k: the refinable part of the `linear` kind."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.k = weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def refinable_parameters(self):
        return list(self.head.named_parameters())

    @contextmanager
    def per_member(self):
        yield self


def _disagreement(model: LinearHeads, features: torch.Tensor) -> float:
    """The target loss: mean over samples of (1/K) Σ_k (r_k − r̄)²."""
    with torch.no_grad():
        rewards = model(features)
    return (rewards - rewards.mean(1, keepdim=True)).square().mean().item()


def test_score_sign_is_the_sign_of_one_sgd_steps_effect_on_the_target_loss_by_hand():
    from uprlhf.selection.influence import batch_gradients

    # Two heads, W = I, b = 0. Candidate a = (2, 0): r = (2, 0), r̄ = 1, so the expected-loss gradient
    # (r_k − r̄)·(x, 1) per head is w0 (2, 0), w1 (−2, 0), b (1, −1). Candidate b = (0, 2): w0 (0, −2),
    # w1 (0, 2), b (−1, 1). Target v = (1, 0): r = (1, 0), gradient w0 (0.5, 0), w1 (−0.5, 0), b (0.5, −0.5).
    # ⟨target, a⟩ = 1 + 1 + 0.5 + 0.5 = 3, |a| = √10, |target| = 1: score 3/√10, and a step of η on a takes
    # the target loss from 0.25 to (0.5 − 3η)², i.e. by −3η to first order. ⟨target, b⟩ = −1: score −1/√10,
    # and the loss rises to (0.5 + η)².
    model = LinearHeads(torch.eye(2), torch.zeros(2))
    candidates, target = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    train = batch_gradients(model, {"features": candidates})
    assert torch.allclose(train, torch.tensor([[2.0, 0, -2, 0, 1, -1], [0, -2, 0, 2, -1, 1]]))
    val = batch_gradients(model, {"features": target})
    scores = influence_scores(train[None], {"t": val[None]}, torch.ones(1))
    assert torch.allclose(scores, torch.tensor([3.0, -1.0]) / 10**0.5)

    eta, before = 1e-3, _disagreement(model, target)
    for grad, score, first_order in zip(train, scores, (-3.0, 1.0)):
        stepped = LinearHeads(torch.eye(2), torch.zeros(2))
        with torch.no_grad():
            stepped.head.weight -= eta * grad[:4].reshape(2, 2)
            stepped.head.bias -= eta * grad[4:]
        change = _disagreement(stepped, target) - before
        assert change == pytest.approx(first_order * eta, rel=1e-2)
        assert (change < 0) == (score > 0)


def test_score_sign_matches_a_real_sgd_step_on_a_lora_ensemble(lora_checkpoints):
    """Plain-SGD scores (no Adam, no projection) against the measured change of the validation disagreement."""
    from uprlhf.reward.training import collate, encode_texts
    from uprlhf.selection.influence import batch_gradients, gradients_of

    paths, tok = lora_checkpoints
    ensemble = InfluenceCheckpoint.load(paths[-1]).ensemble.double()  # loss changes of a small step need float64
    params = [p for _, p in ensemble.refinable_parameters()]
    prompts, responses = _candidates(8, seed=2)
    val_pairs = toy_pairs(8, 3)
    val_inputs = collate(tok, encode_texts(tok, [r["prompt"] for r in val_pairs], [r["chosen"] for r in val_pairs], 24))

    def target_loss() -> float:
        with torch.no_grad(), gradients_of(ensemble, params):
            rewards = ensemble(**val_inputs)
        return (rewards - rewards.mean(1, keepdim=True)).square().mean().item()

    train = batch_gradients(ensemble, collate(tok, encode_texts(tok, prompts, responses, 24)))
    val = batch_gradients(ensemble, val_inputs)
    scores = influence_scores(train[None], {"default": val[None]}, torch.ones(1))
    before, eta = target_loss(), 1e-2 / train.norm(dim=1).max().item()
    sizes = [p.numel() for p in params]

    def loss_after(grad: torch.Tensor, step: float) -> float:
        """The target loss with every parameter moved by step·grad, the parameters restored afterwards."""
        with torch.no_grad():
            for p, g in zip(params, grad.split(sizes)):
                p += step * g.reshape(p.shape)
        loss = target_loss()
        with torch.no_grad():
            for p, g in zip(params, grad.split(sizes)):
                p -= step * g.reshape(p.shape)
        return loss

    changes, central = [], []  # the real SGD step's change; the central difference, exact to second order
    for grad in train:
        down, up = loss_after(grad, -eta), loss_after(grad, eta)
        changes.append(down - before)
        central.append((down - up) / 2)
    changes, central = torch.tensor(changes, dtype=torch.float64), torch.tensor(central, dtype=torch.float64)
    first_order = -eta * train @ val.mean(0)
    # The disagreement is quadratic in the rewards, so a one-sided step's curvature term can rival a
    # small candidate's first-order change; the central difference cancels it.
    assert torch.allclose(central, first_order, rtol=0.1, atol=1e-3 * first_order.abs().max().item())
    clear = scores.abs() > 0.05
    assert clear.sum() >= 4 and torch.equal(changes[clear] < 0, scores[clear] > 0)


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


def test_ranker_aggregates_subtasks_by_mean_or_max(lora_checkpoints):
    paths, tok = lora_checkpoints
    val = {"pos": ([r["prompt"] for r in toy_pairs(8, 1)], [r["chosen"] for r in toy_pairs(8, 1)]),
           "neg": ([r["prompt"] for r in toy_pairs(8, 2)], [r["rejected"] for r in toy_pairs(8, 2)])}
    prompts, responses = _candidates(6, seed=6)
    ranked = {how: InfluenceRanker(paths, tok, val, dim=256, seed=0, adam_eps=1e-8, max_length=24, aggregation=how).scores(prompts, responses)
              for how in ("mean", "max")}
    ranker = InfluenceRanker(paths, tok, val, dim=256, seed=0, adam_eps=1e-8, max_length=24)
    per_subtask = {name: InfluenceRanker(paths, tok, {name: v}, dim=256, seed=0, adam_eps=1e-8, max_length=24).scores(prompts, responses)
                   for name, v in val.items()}
    assert ranker.adam_normalized and ranker.aggregation == "mean"
    assert torch.allclose(ranked["mean"], (per_subtask["pos"] + per_subtask["neg"]) / 2, atol=1e-6)
    assert torch.allclose(ranked["max"], torch.maximum(per_subtask["pos"], per_subtask["neg"]), atol=1e-6)
    with pytest.raises(ValueError, match="unknown subtask aggregation"):
        InfluenceRanker(paths, tok, val, dim=256, seed=0, adam_eps=1e-8, max_length=24, aggregation="min")


def test_ranker_refuses_a_single_member(tiny_reward_backbone, tmp_path):
    path = tmp_path / "single"
    ensemble_class("single")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=1), 1e-3, 1e-3, 0).save(path)
    with pytest.raises(ValueError, match="at least 2 members"):
        InfluenceRanker([path], None, {}, dim=16, seed=0, adam_eps=1e-8, max_length=24)


def test_budget_is_gamma_then_eta_of_the_candidates():
    from uprlhf.selection.strategies import Budget

    assert Budget.of(100, 0.5, 0.5) == Budget(50, 25)
    assert Budget.of(3, 0.1, 0.1) == Budget(1, 1)
    assert Budget.of(0, 0.5, 0.5) == Budget(0, 0)


@pytest.mark.parametrize("name", ["ugda", "uncertainty", "influence", "random"])
def test_every_strategy_selects_the_same_budget_without_repeats(name):
    from uprlhf.selection.strategies import STRATEGIES, Budget

    variance = torch.rand(40, generator=torch.Generator().manual_seed(1))
    picked = STRATEGIES[name](variance, Budget.of(40, 0.5, 0.5), lambda idx: torch.tensor(idx, dtype=torch.float), torch.Generator().manual_seed(0))
    assert len(picked) == 10 and len(set(picked)) == 10 and all(0 <= i < 40 for i in picked)


def test_strategies_pick_by_uncertainty_then_influence():
    from uprlhf.selection.strategies import STRATEGIES, Budget

    variance = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4])
    influence = torch.tensor([0.0, 1.0, 2.0, 0.5, 9.0, 8.0, 7.0, 6.0])
    seen = []

    def score(indices):
        seen.append(list(indices))
        return influence[indices]

    budget, gen = Budget.of(8, 0.5, 0.5), torch.Generator().manual_seed(0)
    assert STRATEGIES["uncertainty"](variance, budget, score, gen) == [0, 1]
    assert STRATEGIES["influence"](variance, budget, score, gen) == [4, 5]
    assert STRATEGIES["ugda"](variance, budget, score, gen) == [2, 1]
    assert seen[-1] == [0, 1, 2, 3]  # ugda scores only the uncertain half
    assert STRATEGIES["random"](variance, budget, score, torch.Generator().manual_seed(3)) == \
        STRATEGIES["random"](variance, budget, score, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["linear", "lora"])
def test_refinement_moves_members_onto_their_targets_and_only_refinable_weights(kind, tiny_reward_checkpoint, lora_checkpoints):
    from uprlhf.reward.evaluation import score_texts
    from uprlhf.selection.refine import refine_ensemble

    path = tiny_reward_checkpoint if kind == "linear" else lora_checkpoints[0][-1]
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    ensemble = RewardEnsemble.load(path)
    before = {n: p.detach().clone() for n, p in ensemble.named_parameters()}
    refinable = {n for n, _ in ensemble.refinable_parameters()}
    prompts, responses = _candidates(24, seed=4)
    start_rewards = score_texts(ensemble, tok, prompts, responses, max_length=24)
    targets = start_rewards + torch.tensor([[0.5 * (k + 1) for k in range(ensemble.k)]])  # each member its own shift
    start = torch.nn.functional.mse_loss(start_rewards, targets).item()
    losses = refine_ensemble(ensemble, tok, prompts, responses, targets, epochs=15, lr=3e-2, batch_size=8, max_length=24, seed=0)
    end = torch.nn.functional.mse_loss(score_texts(ensemble, tok, prompts, responses, max_length=24), targets).item()
    assert end < 0.7 * start and losses[-1] < losses[0]
    changed = {n for n, p in ensemble.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= refinable
    assert not ensemble.training


def _replay_table(n: int, k: int, seed: int = 0):
    import pyarrow as pa

    prompts, responses = _candidates(n, seed)
    gen = torch.Generator().manual_seed(seed)
    return pa.table({
        "step": [i // 8 for i in range(n)], "sample": [i % 8 for i in range(n)], "prompt": prompts, "response": responses,
        "member_rewards": torch.randn(n, k, generator=gen).tolist(), "reward_std": torch.rand(n, generator=gen).tolist(),
    })


@pytest.mark.parametrize("strategy", ["ugda", "random"])
def test_selector_round_labels_the_budget_refines_and_publishes_a_loadable_version(strategy, lora_checkpoints, tmp_path):
    from uprlhf.config import SelectorConfig
    from uprlhf.selection.labelers import build_labeler
    from uprlhf.selection.selector import Selector, validation_sets

    paths, _ = lora_checkpoints
    cfg = SelectorConfig(strategy=strategy, projection_dim=128, epochs=2)
    selector = Selector(
        cfg, build_labeler(cfg.labeler, tmp_path), out=tmp_path, checkpoints=paths,
        validation=validation_sets([{**r, "subtask": "a" if i % 2 else "b"} for i, r in enumerate(toy_pairs(12))], 4, 0),
        max_length=24,
    )
    result = selector.run(_replay_table(32, 3), paths[-1], version=0, through_step=3)
    assert (result.candidates, result.selected, result.labelled, result.version) == (32, 8, 8, 1)
    assert sum(result.label_counts.values()) == 8 and len(result.refine_losses) == 2
    assert Path(result.checkpoint) == tmp_path / "ensembles" / "v0001"
    refined = RewardEnsemble.load(result.checkpoint)
    original = RewardEnsemble.load(paths[-1])
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(refined.refinable_parameters(), original.refinable_parameters()))
    log = [json.loads(line) for line in (tmp_path / "selections.jsonl").read_text().splitlines()]
    assert log[0]["selected_ids"] == result.selected_ids and log[0]["strategy"] == strategy
    assert result.adam_normalized is (True if strategy == "ugda" else None)


def test_validation_sets_group_chosen_responses_by_subtask():
    from uprlhf.selection.selector import validation_sets

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": "r", "subtask": "x" if i < 3 else None} for i in range(5)]
    sets = validation_sets(rows, per_subtask=2, seed=0)
    assert sorted(sets) == ["default", "x"]
    assert len(sets["x"][1]) == 2 and set(sets["x"][1]) <= {"c0", "c1", "c2"}
    assert sorted(sets["default"][1]) == ["c3", "c4"]


def test_influence_checkpoints_are_the_training_checkpoints_beside_final(tmp_path):
    from uprlhf.selection.selector import influence_checkpoints

    for name in ("ckpt_10", "ckpt_2", "final"):
        (tmp_path / name).mkdir()
    assert [p.name for p in influence_checkpoints(tmp_path / "final")] == ["ckpt_2", "ckpt_10"]
    assert influence_checkpoints(tmp_path / "ckpt_2" / "x") == [tmp_path / "ckpt_2" / "x"]


@pytest.mark.parametrize("kind", ["linear", "lora", "multi_backbone"])
def test_batched_per_sample_gradients_equal_one_backward_per_sample(
    kind, tiny_reward_checkpoint, lora_checkpoints, tiny_reward_backbone, tiny_policy
):
    from uprlhf.reward.training import collate, encode_texts
    from uprlhf.selection.influence import batch_gradients, gradients_of

    if kind == "multi_backbone":  # the frozen block's heads are refinable too: their rows count like any head's
        tok = AutoTokenizer.from_pretrained(tiny_reward_backbone)
        cfg = EnsembleConfig(k=4, member_backbones=[ModelConfig(name_or_path=str(tiny_policy))])
        ensemble = ensemble_class(kind)(ModelConfig(name_or_path=str(tiny_reward_backbone)), cfg, 1e-3, 1e-2, 0).eval()
        assert {name for name, _ in ensemble.refinable_parameters()} >= {"frozen_blocks.0.heads.weight"}
    else:
        path = tiny_reward_checkpoint if kind == "linear" else lora_checkpoints[0][-1]
        tok = AutoTokenizer.from_pretrained(path / "tokenizer")
        ensemble = RewardEnsemble.load(path)
    params = [p for _, p in ensemble.refinable_parameters()]
    prompts, responses = _candidates(6, seed=7)  # 1-6 words: the batch is padded
    items = encode_texts(tok, prompts, responses, 24)

    def one_backward(item) -> torch.Tensor:
        """The sample's MSE to its ensemble mean, held fixed: the refinement loss with r̄ as the label."""
        rewards = ensemble(**collate(tok, [item]))
        loss = mse_refinement_loss(rewards, rewards.mean(1, keepdim=True).expand_as(rewards).detach())
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    with gradients_of(ensemble, params):
        one_by_one = torch.stack([one_backward(item) for item in items])
    batched = batch_gradients(ensemble, collate(tok, items))
    assert len({len(i["input_ids"]) for i in items}) > 1
    assert torch.allclose(batched, one_by_one, atol=1e-6, rtol=1e-4)
    assert one_by_one.abs().sum() > 0


def test_config_takes_exactly_the_registered_strategies():
    from pydantic import ValidationError

    from uprlhf.selection.config import RefineConfig, SelectorConfig
    from uprlhf.selection.strategies import STRATEGIES

    for name in ("off", *STRATEGIES):
        assert SelectorConfig(strategy=name).strategy == name
    with pytest.raises(ValidationError, match="unknown selection strategy 'best'; allowed: 'off', 'ugda'"):
        SelectorConfig(strategy="best")
    assert RefineConfig(run_dir="r", strategies=list(STRATEGIES)).strategies == list(STRATEGIES)
    with pytest.raises(ValidationError, match="unknown selection strategy 'off'"):
        RefineConfig(run_dir="r", strategies=["off"])  # "off" is the selector's, not a strategy to compare


def test_config_aggregates_subtasks_by_their_mean_unless_told_max():
    from pydantic import ValidationError

    from uprlhf.selection.config import SelectorConfig

    assert SelectorConfig().subtask_aggregation == "mean"
    assert SelectorConfig(subtask_aggregation="max").subtask_aggregation == "max"
    with pytest.raises(ValidationError, match="subtask_aggregation"):
        SelectorConfig(subtask_aggregation="sum")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_selector_on_gpu_ranks_like_the_cpu_and_publishes(lora_checkpoints, tmp_path):
    from uprlhf.config import SelectorConfig
    from uprlhf.selection.labelers import build_labeler
    from uprlhf.selection.selector import Selector, validation_sets

    paths, tok = lora_checkpoints
    val = {"default": ([r["prompt"] for r in toy_pairs(8, 3)], [r["chosen"] for r in toy_pairs(8, 3)])}
    prompts, responses = _candidates(24, seed=5)
    scores = {device: InfluenceRanker(paths, tok, val, dim=8192, seed=0, adam_eps=1e-8, max_length=24, device=device).scores(prompts, responses)
              for device in ("cpu", "cuda")}
    assert torch.allclose(scores["cuda"], scores["cpu"], atol=1e-3)
    cfg = SelectorConfig(strategy="ugda", projection_dim=8192, epochs=2)
    selector = Selector(cfg, build_labeler(cfg.labeler, tmp_path), out=tmp_path, checkpoints=paths,
                        validation=validation_sets(toy_pairs(8), 4, 0), max_length=24, device="cuda")
    result = selector.run(_replay_table(32, 3), paths[-1], version=0, through_step=3)
    assert result.version == 1 and result.labelled == 8 and len(result.refine_losses) == 2
    assert RewardEnsemble.load(result.checkpoint).k == 3
