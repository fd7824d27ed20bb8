import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import PlainEngine, toy_pairs
from uprlhf.config import EnsembleConfig, ModelConfig, TrainConfig
from uprlhf.reward.ensembles import ensemble_class
from uprlhf.reward.evaluation import evaluate, member_stats, score_texts
from uprlhf.reward.metrics import ood_auroc, preference_accuracy
from uprlhf.reward.training import MOMENTS_FILE, bootstrap_weights, pair_budget, shard_indices, split_warmup, train_ensemble


def test_shards_have_equal_length_and_cover_every_row():
    shards = [shard_indices(10, rank, 3, seed=0) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*shards) == set(range(10))


def test_warmup_split_is_disjoint_and_complete():
    warm, rest = split_warmup(10, 0.3, seed=0)
    assert len(warm) == 3 and len(rest) == 7
    assert sorted(warm + rest) == list(range(10))


def test_a_pair_budget_is_a_seeded_nested_draw_in_file_order():
    small, large = pair_budget(100, 10, seed=3), pair_budget(100, 40, seed=3)
    assert len(small) == 10 and len(large) == 40 and set(small) <= set(large)
    assert small == sorted(small) and small == pair_budget(100, 10, seed=3) != pair_budget(100, 10, seed=4)
    assert pair_budget(5, None, seed=0) == pair_budget(5, 9, seed=0) == [0, 1, 2, 3, 4]


def test_bootstrap_weights_are_seeded_poisson_counts():
    w = bootstrap_weights(2000, 3, seed=1)
    assert torch.equal(w, bootstrap_weights(2000, 3, seed=1))
    assert w.shape == (2000, 3)
    assert abs(w.mean().item() - 1.0) < 0.08
    assert (w == 0).float().mean().item() == pytest.approx(0.368, abs=0.04)


def _train(kind, backbone, **ens):
    tok = AutoTokenizer.from_pretrained(backbone)
    ensemble = ensemble_class(kind)(ModelConfig(name_or_path=str(backbone)), EnsembleConfig(k=3, **ens).for_kind(kind), 3e-3, 3e-2, 0)
    checkpoints, log = [], []
    stats = train_ensemble(
        ensemble,
        tok,
        toy_pairs(96),
        TrainConfig(batch_size=16, epochs=4, checkpoints=2, max_length=24),
        warmup_fraction=0.3,
        bootstrap=False,
        rank=0,
        world_size=1,
        make_engine=PlainEngine,
        on_checkpoint=checkpoints.append,
        log=log.append,
    )
    return ensemble, tok, checkpoints, log, stats


@pytest.mark.parametrize(("kind", "top_layers"), [("independent", None), ("linear", None), ("frozen_heads", None), ("lora", None),
                                                  ("diverse_lora", 1), ("single", None)])
def test_training_learns_separable_preferences(kind, top_layers, tiny_reward_backbone):
    ensemble, tok, _, log, _ = _train(kind, tiny_reward_backbone, lora_top_layers=top_layers)
    figures = evaluate(ensemble, tok, toy_pairs(32, seed=5), [{"prompt": "x", "response": "zz qq xx"}] * 4, max_length=24)
    assert figures["accuracy"] >= 0.9
    last = [r["loss"] for r in log if r["phase"] == log[-1]["phase"]]
    assert sum(last[-3:]) / 3 < sum(last[:3]) / 3


@pytest.mark.parametrize("kind", ["independent", "lora"])
def test_members_learn_around_their_random_priors(kind, tiny_reward_backbone):
    """Scored with f_k + β·p_k, a trained ensemble still ranks held-out pairs: the losses fitted the sum."""
    ensemble, tok, _, _, _ = _train(kind, tiny_reward_backbone, prior_scale=1.0)
    figures = evaluate(ensemble, tok, toy_pairs(32, seed=5), [{"prompt": "x", "response": "zz qq xx"}] * 4, max_length=24)
    assert figures["accuracy"] >= 0.9


def test_member_stats_and_the_normalised_figures_are_those_of_the_standardised_scores(tiny_reward_backbone):
    ensemble, tok, _, _, _ = _train("lora", tiny_reward_backbone)
    train, test, ood = toy_pairs(16, seed=1), toy_pairs(24, seed=5), [{"prompt": "x", "response": "zz qq xx"}] * 4
    stats = member_stats(ensemble, tok, train, max_length=24, seed=0)
    scores = score_texts(ensemble, tok, [r["prompt"] for r in train] * 2,
                         [r["chosen"] for r in train] + [r["rejected"] for r in train], max_length=24)
    torch.testing.assert_close(torch.tensor(stats.mean), scores.mean(0))
    torch.testing.assert_close(torch.tensor(stats.std), scores.std(0, correction=0))
    assert stats.responses == 32
    ensemble.member_stats = stats
    figures = evaluate(ensemble, tok, test, ood, max_length=24)
    ensemble.normalise = True
    assert evaluate(ensemble, tok, test, ood, max_length=24) == figures  # it scores raw, whatever the flag
    assert ensemble.normalise
    ensemble.normalise = False

    def standardised(prompts, responses):
        return stats.apply(score_texts(ensemble, tok, prompts, responses, max_length=24))

    chosen = standardised([r["prompt"] for r in test], [r["chosen"] for r in test])
    rejected = standardised([r["prompt"] for r in test], [r["rejected"] for r in test])
    ood_std = standardised([r["prompt"] for r in ood], [r["response"] for r in ood]).std(1, correction=0)
    on_task_std = torch.cat([chosen, rejected]).std(1, correction=0)
    assert figures["normalised_accuracy"] == preference_accuracy(chosen.mean(1) - rejected.mean(1))
    assert figures["normalised_ood_auroc"] == ood_auroc(on_task_std, ood_std)
    assert figures["normalised_uncertainty_on_task"] == pytest.approx(float(on_task_std.mean()))


def test_checkpoints_carry_moments_and_decaying_mean_lr(tiny_reward_backbone, tmp_path):
    ensemble, _, checkpoints, _, stats = _train("lora", tiny_reward_backbone)
    assert len(checkpoints) == 2
    assert all(c.phase == "members" for c in checkpoints)
    assert checkpoints[0].mean_lr > checkpoints[1].mean_lr > 0
    lora_names = {n for n, p in ensemble.named_parameters() if p.requires_grad}
    assert {k.rsplit(".", 1)[0] for k in checkpoints[0].moments} == lora_names
    info = checkpoints[-1].write(tmp_path)
    assert info["has_moments"] and (tmp_path / MOMENTS_FILE).exists()
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert stats["member_params"] < stats["trainable_params"]


def test_diverse_lora_ends_more_diverse_than_lora(tiny_reward_backbone):
    from uprlhf.reward.ensembles import nuclear_diversity

    plain = nuclear_diversity(_train("lora", tiny_reward_backbone)[0].lora_a_matrices()).item()
    diverse = nuclear_diversity(_train("diverse_lora", tiny_reward_backbone, nnm_lambda=1.0)[0].lora_a_matrices()).item()
    assert diverse > plain


def test_warmup_split_always_leaves_rows_for_the_members():
    warm, rest = split_warmup(2, 0.9, seed=0)
    assert len(warm) == 1 and len(rest) == 1


def test_too_few_pairs_fail_before_training(tiny_reward_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_reward_backbone)
    ensemble = ensemble_class("lora")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=2), 1e-3, 1e-2, 0)
    with pytest.raises(ValueError, match=r"1 training pairs leave no data for phase\(s\) \['warmup'\]"):
        train_ensemble(
            ensemble, tok, toy_pairs(1), TrainConfig(), warmup_fraction=0.3, bootstrap=False, rank=0, world_size=1,
            make_engine=PlainEngine, on_checkpoint=lambda c: None,
        )


def test_joined_pairs_pad_input_ids_with_the_pad_token():
    from uprlhf.reward.ensembles import PairBatch

    chosen = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    rejected = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.tensor([[1]])}
    joined = PairBatch(chosen, rejected, pad_id=9).joined()
    assert joined["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
