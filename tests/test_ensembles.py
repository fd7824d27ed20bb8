import math
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import toy_pairs
from uprlhf.config import ConfigError, EnsembleConfig, ModelConfig, TrainRewardConfig, load_config
from uprlhf.reward.config import k_problem
from uprlhf.reward.ensembles import (
    ENSEMBLES, MemberStats, PairBatch, RewardEnsemble, ensemble_class, member_blocks, nuclear_diversity, write_member_stats,
)
from uprlhf.reward.losses import bradley_terry_loss
from uprlhf.reward.training import collate, encode_texts

# The kinds the default shape builds; multi_backbone needs ensemble.member_backbones and has tests of its own below.
KINDS = ["independent", "linear", "frozen_heads", "lora", "diverse_lora", "single"]


def test_nuclear_diversity_of_identical_members_is_one():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    assert float(nuclear_diversity([[a, a.clone()]])) == pytest.approx(1.0)


def test_nuclear_diversity_of_orthogonal_members_is_sqrt_members():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # stacked [[1,0],[0,2]]: nuclear 3, Frobenius sqrt(5)
    assert float(nuclear_diversity([[a, b]])) == pytest.approx(3 / math.sqrt(5))


def test_nuclear_diversity_averages_modules_and_is_differentiable():
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0]], requires_grad=True)
    value = nuclear_diversity([[a, b], [a, a]])
    assert value.item() == pytest.approx((math.sqrt(2) + 1.0) / 2)
    value.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_unknown_kind_lists_the_registry():
    with pytest.raises(ValueError, match="unknown ensemble kind 'bagging'; allowed: 'independent', 'linear', 'frozen_heads', 'lora', 'diverse_lora', 'single', 'multi_backbone'"):
        ensemble_class("bagging")
    assert list(ENSEMBLES) == [*KINDS, "multi_backbone"]


def _build(kind, backbone, k=3, seed=0, **cfg):
    ens = ensemble_class(kind)(ModelConfig(name_or_path=str(backbone)), EnsembleConfig(k=k, **cfg), 1e-3, 1e-2, seed)
    for phase in ens.phases():  # attaches LoRA adapters where the kind has them
        phase.prepare()
    return ens.eval()


def _batch(backbone, n=4):
    tok = AutoTokenizer.from_pretrained(backbone)
    rows = toy_pairs(n)
    return collate(tok, encode_texts(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], 32))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_returns_member_rewards_and_survives_save_and_load(kind, tiny_reward_backbone, tmp_path):
    backbone = shutil.copytree(tiny_reward_backbone, tmp_path / "backbone")
    k = EnsembleConfig(k=3).for_kind(kind).k
    ens = _build(kind, backbone, k=k)
    batch = _batch(tiny_reward_backbone)
    with torch.no_grad():
        rewards = ens(**batch)
    assert rewards.shape == (4, k)
    ens.save(tmp_path / kind)
    shutil.rmtree(backbone)  # a checkpoint stands on its own
    loaded = RewardEnsemble.load(tmp_path / kind)
    assert loaded.kind == kind and loaded.k == k
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), rewards)


@pytest.mark.parametrize("kind", ["independent", "lora"])
def test_a_random_prior_adds_beta_times_its_fixed_network_in_every_path_and_is_saved(kind, tiny_reward_backbone, tmp_path):
    ens = _build(kind, tiny_reward_backbone, k=3, seed=3, prior_scale=2.0)  # a load rebuilds with seed 0, then reads the file
    batch = _batch(tiny_reward_backbone)
    with torch.no_grad():
        prior = 2.0 * ens.prior(batch["input_ids"], batch["attention_mask"])
        rewards = ens(**batch)
        torch.testing.assert_close(rewards, ens.members_forward(**batch) + prior)
        with ens.per_member():
            torch.testing.assert_close(ens(**batch), rewards)
        torch.testing.assert_close(ens.prior_term(batch, 1), prior[:, 1])
    assert not any(name.startswith("prior.") for name, _ in ens.named_parameters())
    ens.save(tmp_path / kind)
    assert (tmp_path / kind / "prior.safetensors").is_file()
    loaded = RewardEnsemble.load(tmp_path / kind)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), rewards)
    assert _build(kind, tiny_reward_backbone, k=3).prior is None


def test_a_kind_that_trains_the_members_mean_refuses_a_prior(tiny_reward_backbone):
    message = "ensemble.prior_scale must be 0 for kind 'diverse_lora': it trains the members' mean, so nothing fits each member's prior away"
    with pytest.raises(ValueError, match=message):
        _build("diverse_lora", tiny_reward_backbone, prior_scale=1.0)
    with pytest.raises(ConfigError, match=message):
        load_config(TrainRewardConfig, None, ["kinds=[lora, diverse_lora]", "ensemble.prior_scale=1.0"])


def test_the_lora_warmup_heads_train_with_the_priors_of_their_members(tiny_reward_backbone):
    from uprlhf.reward.losses import member_bradley_terry_loss

    ens = ensemble_class("lora")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=3, prior_scale=2.0), 1e-3, 1e-2, 0)
    pairs = _pairs(tiny_reward_backbone)
    warmup = ens.phases()[0]
    with torch.no_grad():
        loss = warmup.loss([pairs])
        chosen, rejected = pairs.split(lambda inputs: ens.base(**inputs).logits + ens.prior_term(inputs))
        bare = pairs.split(lambda inputs: ens.base(**inputs).logits)
    torch.testing.assert_close(loss, member_bradley_terry_loss(chosen, rejected))
    assert not torch.isclose(loss, member_bradley_terry_loss(*bare))


def _pairs(backbone, n=3):
    tok = AutoTokenizer.from_pretrained(backbone)
    rows = toy_pairs(n)
    return PairBatch(*(collate(tok, encode_texts(tok, [r["prompt"] for r in rows], [r[side] for r in rows], 32))
                       for side in ("chosen", "rejected")))


@pytest.mark.parametrize("kind", ["independent", "linear", "frozen_heads", "lora", "single"])
def test_the_member_losses_score_each_member_with_its_prior_and_centre_its_rewards(kind, tiny_reward_backbone):
    """The losses that score members one by one (not through forward) add the same β·p_k, so training fits
    f_k + β·p_k to the pairs, as the ensemble is then scored; each adds η·mean((r⁺ + r⁻)²)."""
    from uprlhf.reward.losses import centering_penalty, member_bradley_terry_loss

    k = EnsembleConfig(k=3).for_kind(kind).k
    ens = _build(kind, tiny_reward_backbone, k=k, prior_scale=2.0, reward_centering=0.5)
    pairs = _pairs(tiny_reward_backbone)
    members = ens.phases()[-1]
    with torch.no_grad(), ens.per_member():
        chosen, rejected = ens.score_pairs(pairs)
        loss = members.loss([pairs] * (k if members.per_member_batches else 1))
        priors = ens.prior_term(pairs.chosen), ens.prior_term(pairs.rejected)

    def bt(c, r):
        return bradley_terry_loss(c[:, 0], r[:, 0]) if kind == "single" else member_bradley_terry_loss(c, r)

    def fit(c, r):
        return bt(c, r) + 0.5 * centering_penalty(c, r)

    torch.testing.assert_close(loss, fit(chosen, rejected))
    assert not torch.isclose(loss, fit(chosen - priors[0], rejected - priors[1]))  # the prior counts in the loss
    assert not torch.isclose(loss, bt(chosen, rejected))  # and so does the centring


@pytest.mark.parametrize("top_layers", [None, 1])
def test_fused_lora_scoring_matches_member_by_member(tiny_reward_backbone, top_layers):
    ens = _build("lora", tiny_reward_backbone, lora_top_layers=top_layers)
    with torch.no_grad():  # make the adapters matter: B matrices start at zero
        for name, p in ens.peft.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.normal_(0, 0.5)
    batch = _batch(tiny_reward_backbone)
    with torch.no_grad():
        fused = ens(**batch)
        sequential = []
        for k in range(3):
            ens.set_member(k)
            sequential.append(ens.peft(**batch).logits[:, 0])
    torch.testing.assert_close(fused, torch.stack(sequential, 1), atol=1e-5, rtol=1e-5)
    assert float(fused.std(1).mean()) > 1e-3
    with torch.no_grad(), ens.per_member():  # the explicit per-member path, still in eval mode
        assert ens.per_member_forward and not ens.training
        torch.testing.assert_close(ens(**batch), fused, atol=1e-5, rtol=1e-5)
    assert not ens.per_member_forward  # restored on leaving


def test_per_member_is_chosen_by_the_flag_not_by_train_mode(tiny_reward_backbone):
    ens = _build("lora", tiny_reward_backbone).train()
    batch = _batch(tiny_reward_backbone)
    with ens.per_member():
        rewards = ens(**batch)
    assert rewards.shape == (4, 3) and rewards.requires_grad
    with torch.no_grad(), pytest.raises(RuntimeError, match="per_member"):
        ens(**batch)  # training mode alone does not pick the per-member path (peft cannot batch it)


def test_prepare_sets_up_each_phase_and_returns_its_groups(tiny_reward_backbone):
    ens = ensemble_class("frozen_heads")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=3), 1e-3, 1e-2, 0)
    backbone, heads = ens.phases()
    groups = backbone.prepare()
    assert [g["lr"] for g in groups] == [1e-3, 1e-2] and all(p.requires_grad for p in ens.parameters())
    (group,) = heads.prepare()
    trainable = [p for p in ens.parameters() if p.requires_grad]
    assert group["lr"] == 1e-2 and {id(p) for p in group["params"]} == {id(p) for p in trainable}
    lora = ensemble_class("lora")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=3), 1e-3, 1e-2, 0)
    warmup, members = lora.phases()
    warmup.prepare()
    assert lora.peft is None
    (group,) = members.prepare()  # attaches the adapters
    assert lora.peft is not None and {id(p) for p in group["params"]} == {id(p) for p in lora.parameters() if p.requires_grad}


def test_lora_top_layers_puts_adapters_on_top_layers_only(tiny_reward_backbone):
    ens = _build("lora", tiny_reward_backbone, lora_top_layers=1)
    names = [n for n, _ in ens.peft.named_parameters() if "lora_A" in n]
    assert names and all(".layer.1." in n for n in names)


def test_lora_a_matrices_cover_every_module_and_member(tiny_reward_backbone):
    ens = _build("diverse_lora", tiny_reward_backbone, lora_rank=4)
    mats = ens.lora_a_matrices()
    assert len(mats) == 2 * 2  # query and value in 2 layers
    assert all(len(m) == 3 and m[0].shape == (4, 32) for m in mats)


def test_head_kinds_have_no_lora_matrices(tiny_reward_backbone):
    assert _build("linear", tiny_reward_backbone).lora_a_matrices() == []


def test_score_pairs_splits_chosen_from_rejected(tiny_reward_backbone):
    ens = _build("linear", tiny_reward_backbone)
    tok = AutoTokenizer.from_pretrained(tiny_reward_backbone)
    rows = toy_pairs(3)
    chosen = collate(tok, encode_texts(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], 32))
    rejected = collate(tok, encode_texts(tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows], 32))
    with torch.no_grad():
        c, r = ens.score_pairs(PairBatch(chosen, rejected))
        torch.testing.assert_close(c, ens(**chosen), atol=1e-5, rtol=1e-5)
    assert c.shape == r.shape == (3, 3)


def test_the_manifest_is_written_atomically_after_the_weights(tiny_reward_backbone, tmp_path, monkeypatch):
    import uprlhf.atomic
    from uprlhf.reward.ensembles import MANIFEST

    real, written = uprlhf.atomic.atomic_write, []

    def spy(path, write, **kwargs):
        written.append((path.name, sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("."))))
        return real(path, write, **kwargs)

    monkeypatch.setattr(uprlhf.atomic, "atomic_write", spy)
    ensemble = ensemble_class("linear")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=2), 1e-3, 1e-3, 0)
    ensemble.save(tmp_path / "ens")
    assert written == [(MANIFEST, ["model"])]  # a reader that sees the manifest finds every weight file
    assert RewardEnsemble.load(tmp_path / "ens").k == 2


def test_single_kind_is_one_reward_model_with_zero_spread(tiny_reward_backbone):
    ens = _build("single", tiny_reward_backbone, k=1)
    batch = _batch(tiny_reward_backbone)
    with torch.no_grad():
        rewards = ens(**batch)
        alone = ens.members[0](**batch).logits
    assert rewards.shape == (4, 1)
    torch.testing.assert_close(rewards, alone)
    assert torch.equal(rewards.std(1, correction=0), torch.zeros(4))
    (phase,) = ens.phases()
    (group,) = phase.prepare()
    assert {id(p) for p in group["params"]} == {id(p) for p in ens.parameters()} and all(p.requires_grad for p in ens.parameters())
    rows = toy_pairs(4)
    tok = AutoTokenizer.from_pretrained(tiny_reward_backbone)
    rejected = collate(tok, encode_texts(tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows], 32))
    pairs = PairBatch(batch, rejected, weights=torch.full((4, 1), 3.0))  # bootstrap counts: ignored
    with torch.no_grad():
        expected = bradley_terry_loss(alone[:, 0], ens(**rejected)[:, 0])
        torch.testing.assert_close(phase.loss([pairs]), expected)


def test_single_kind_refuses_more_members_and_ensembles_refuse_one(tiny_reward_backbone):
    backbone = ModelConfig(name_or_path=str(tiny_reward_backbone))
    with pytest.raises(ValueError, match=r"^ensemble\.k must be 1 for kind 'single', got 3$"):
        ensemble_class("single")(backbone, EnsembleConfig(k=3), 1e-3, 1e-2, 0)
    assert k_problem("single", 3, "reward_k") == "reward_k must be 1 for kind 'single', got 3"
    with pytest.raises(ValueError, match=r"ensemble\.k must be >= 2 for kind 'linear' \(an ensemble; one model is kind 'single'\), got 1"):
        ensemble_class("linear")(backbone, EnsembleConfig(k=1), 1e-3, 1e-2, 0)
    with pytest.raises(ConfigError, match=r"ensemble\.k must be >= 2 for kind 'lora'"):
        load_config(TrainRewardConfig, None, ["kinds=[single, lora]", "ensemble.k=1"])


def test_train_reward_config_trains_single_as_one_model_beside_the_ensembles():
    cfg = TrainRewardConfig(kinds=["single", "linear"], ensemble=EnsembleConfig(k=3, lora_rank=4))
    assert cfg.ensemble_for("single") == EnsembleConfig(k=1, lora_rank=4)
    assert cfg.ensemble_for("linear") is cfg.ensemble
    assert TrainRewardConfig().ensemble.warmup_fraction == 0.5


@pytest.mark.parametrize("kind", ["lora", "diverse_lora"])
def test_lora_members_start_from_their_own_warmup_heads(kind, tiny_reward_backbone):
    ens = ensemble_class(kind)(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=3), 1e-3, 1e-2, 0)
    warmup, members = ens.phases()
    optimizer = torch.optim.AdamW(warmup.prepare())
    tok = AutoTokenizer.from_pretrained(tiny_reward_backbone)
    rows = toy_pairs(4)
    chosen = _batch(tiny_reward_backbone)
    rejected = collate(tok, encode_texts(tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows], 32))
    pairs = PairBatch(chosen, rejected)
    c, r = pairs.split(lambda inputs: ens.base(**inputs).logits)
    assert c.shape == (4, 3)  # a linear-layer ensemble: K heads on the shared backbone
    per_head = [bradley_terry_loss(c[:, k], r[:, k]) for k in range(3)]
    loss = warmup.loss([pairs])
    torch.testing.assert_close(loss, torch.stack(per_head).mean())  # each head its own BT loss
    seeded = ens.base.classifier.weight.detach().clone()
    loss.backward()
    optimizer.step()
    ens.eval()
    heads = ens.base.classifier
    weight, bias = heads.weight.detach().clone(), heads.bias.detach().clone()
    with torch.no_grad():
        warm = ens.base(**chosen).logits
    assert not torch.allclose(weight, seeded)  # the heads were trained
    members.prepare()
    ens.eval()
    member_heads = ens.base.classifier.modules_to_save
    for k, name in enumerate(ens.names):
        assert torch.equal(member_heads[name].weight, weight[k : k + 1])
        assert torch.equal(member_heads[name].bias, bias[k : k + 1])
    assert not torch.allclose(member_heads["m0"].weight, member_heads["m1"].weight)
    with torch.no_grad():
        torch.testing.assert_close(ens(**chosen), warm, atol=1e-5, rtol=1e-5)  # B = 0: member k scores as head k
    assert float(warm.std(1).mean()) > 1e-3


def test_gaussian_lora_init_draws_a_with_std_one_over_rank(tiny_reward_backbone):
    def a_matrices(init):
        return _build("lora", tiny_reward_backbone, lora_rank=4, lora_init=init).lora_a_matrices()

    gaussian, kaiming = a_matrices("gaussian"), a_matrices("kaiming")
    every = torch.cat([a.detach().flatten() for members in gaussian for a in members])
    assert every.std().item() == pytest.approx(1 / 4, rel=0.1)  # peft's N(0, (1/r)^2)
    bound = 1 / math.sqrt(32)  # Kaiming-uniform (a = sqrt 5) on fan-in 32: U(-1/sqrt 32, 1/sqrt 32)
    assert every.abs().max().item() > bound
    assert all(a.abs().max().item() <= bound for members in kaiming for a in members)
    for members in gaussian:  # each member its own seeded draw
        assert not torch.allclose(members[0], members[1]) and not torch.allclose(members[1], members[2])


def test_member_stats_are_each_members_mean_and_population_std_and_standardise_member_by_member():
    rewards = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    stats = MemberStats.of(rewards)
    assert stats.mean == [2.0, 20.0] and stats.std == [1.0, 10.0] and stats.responses == 2
    torch.testing.assert_close(stats.apply(torch.tensor([[2.0, 40.0], [0.0, 20.0]])), torch.tensor([[0.0, 2.0], [-2.0, 0.0]]))
    with pytest.raises(ValueError, match="every std must be > 0"):
        MemberStats([0.0], [0.0], 1)


def test_a_normalised_load_standardises_the_members_and_a_plain_load_does_not(tiny_reward_backbone, tmp_path):
    ens = _build("linear", tiny_reward_backbone, k=3)
    batch = _batch(tiny_reward_backbone)
    ens.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="no member_stats to normalise the members by"):
        RewardEnsemble.load(tmp_path / "ckpt", normalise=True)
    stats = MemberStats([0.5, -1.0, 2.0], [2.0, 0.5, 4.0], 8)
    write_member_stats(tmp_path / "ckpt", stats)
    with torch.no_grad():
        raw = RewardEnsemble.load(tmp_path / "ckpt")(**batch)
        normalised = RewardEnsemble.load(tmp_path / "ckpt", normalise=True)(**batch)
    torch.testing.assert_close(raw, ens(**batch))
    torch.testing.assert_close(normalised, (raw - torch.tensor([0.5, -1.0, 2.0])) / torch.tensor([2.0, 0.5, 4.0]))
    loaded = RewardEnsemble.load(tmp_path / "ckpt")
    loaded.save(tmp_path / "again")  # a refined ensemble keeps the stats of its training distribution
    assert RewardEnsemble.load(tmp_path / "again").member_stats == stats
    with pytest.raises(ValueError, match="K is 3 but the stats have 2 members"):
        write_member_stats(tmp_path / "ckpt", MemberStats([0.0, 0.0], [1.0, 1.0], 2))


def test_member_blocks_deal_k_members_in_near_equal_contiguous_blocks():
    assert member_blocks(10, 2) == [5, 5]
    assert member_blocks(5, 2) == [3, 2]
    assert member_blocks(7, 3) == [3, 2, 2]


def _multi_backbone(reward_backbone, member_backbone, k=5, seed=0):
    cfg = EnsembleConfig(k=k, member_backbones=[ModelConfig(name_or_path=str(member_backbone))])
    return ensemble_class("multi_backbone")(ModelConfig(name_or_path=str(reward_backbone)), cfg, 1e-3, 1e-2, seed)


def test_multi_backbone_scores_each_block_on_its_own_backbone_and_survives_save_and_load(tiny_reward_backbone, tiny_policy, tmp_path):
    reward = shutil.copytree(tiny_reward_backbone, tmp_path / "reward")
    policy = shutil.copytree(tiny_policy, tmp_path / "policy")
    ens = _multi_backbone(reward, policy).eval()
    batch = _batch(tiny_reward_backbone)
    rows = toy_pairs(4)
    with torch.no_grad():
        rewards = ens(**batch)
        own = ens.model(**batch).logits
        # The frozen block, by hand: the policy backbone's own tokens of the text the reward tokenizer kept.
        texts = [f"{r['prompt']} {r['chosen']}".lower() for r in rows]
        enc = AutoTokenizer.from_pretrained(tiny_policy)(texts, return_tensors="pt", padding=True)
        hidden = ens.frozen_blocks[0].backbone(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        last = hidden[torch.arange(4), enc["attention_mask"].sum(1) - 1]
        features = torch.cat([(hidden * mask).sum(1) / mask.sum(1), last], 1)
        by_hand = ens.frozen_blocks[0].heads(torch.nn.functional.layer_norm(features, features.shape[-1:]))
    assert rewards.shape == (4, 5) and own.shape == (4, 3)
    assert ens.reward_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == texts
    torch.testing.assert_close(rewards, torch.cat([own, by_hand], 1), atol=1e-5, rtol=1e-5)
    ens.save(tmp_path / "ckpt")
    shutil.rmtree(reward)
    shutil.rmtree(policy)  # a checkpoint stands on its own, the frozen backbone included
    loaded = RewardEnsemble.load(tmp_path / "ckpt")
    assert loaded.kind == "multi_backbone" and loaded.k == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), rewards)


def test_a_multi_backbone_row_scores_the_same_alone_and_in_a_padded_batch(tiny_reward_backbone, tiny_policy):
    ens = _multi_backbone(tiny_reward_backbone, tiny_policy).eval()
    batch = _batch(tiny_reward_backbone)
    with torch.no_grad():
        together = ens(**batch)
        alone = torch.cat([ens(**{key: t[i : i + 1, : int(batch["attention_mask"][i].sum())] for key, t in batch.items()})
                           for i in range(4)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_multi_backbone_trains_the_heads_on_the_frozen_backbone_and_never_its_weights(tiny_reward_backbone, tiny_policy):
    ens = _multi_backbone(tiny_reward_backbone, tiny_policy)
    (phase,) = ens.phases()
    groups = phase.prepare()
    frozen = ens.frozen_blocks[0]
    trained = {id(p) for g in groups for p in g["params"]}
    assert not any(p.requires_grad or id(p) in trained for p in frozen.backbone.parameters())
    assert {id(p) for p in frozen.heads.parameters()} <= trained and groups[-1]["lr"] == 1e-2
    assert {name for name, _ in ens.refinable_parameters()} >= {"frozen_blocks.0.heads.weight", "frozen_blocks.0.heads.bias"}
    before = {name: p.detach().clone() for name, p in frozen.named_parameters()}
    optimiser = torch.optim.SGD(groups, lr=0.1)
    ens.train()
    assert not frozen.backbone.training  # no dropout in the frozen features
    loss = phase.loss([_pairs(tiny_reward_backbone)])
    loss.backward()
    optimiser.step()
    changed = {name for name, p in frozen.named_parameters() if not torch.equal(p, before[name])}
    # Only the heads move (their bias by rounding at most: a Bradley-Terry loss sees only differences).
    assert "heads.weight" in changed and changed <= {"heads.weight", "heads.bias"}


def test_multi_backbone_needs_a_further_backbone_and_a_member_on_each():
    assert "multi_backbone" not in TrainRewardConfig().kinds
    with pytest.raises(ConfigError, match=r"ensemble\.member_backbones must name at least one further backbone for kind 'multi_backbone'"):
        load_config(TrainRewardConfig, None, ["kinds=[multi_backbone]"])
    with pytest.raises(ConfigError, match=r"ensemble\.k must be at least 1 \+ len\(ensemble\.member_backbones\) = 3 for kind 'multi_backbone' \(one member per backbone\), got 2"):
        load_config(TrainRewardConfig, None, ["kinds=[multi_backbone]", "ensemble.k=2",
                                              "ensemble.member_backbones=[{name_or_path: a}, {name_or_path: b}]"])
    # One shape serves every kind of a comparison; the others ignore the field.
    cfg = TrainRewardConfig(kinds=["linear", "multi_backbone"],
                            ensemble=EnsembleConfig(k=4, member_backbones=[ModelConfig(name_or_path="packaged:smollm2")]))
    assert cfg.kinds == ["linear", "multi_backbone"]


def test_the_frozen_backbone_runs_once_per_text_and_keeps_no_more_texts_than_its_cache_holds(tiny_reward_backbone, tiny_policy):
    ens = _multi_backbone(tiny_reward_backbone, tiny_policy).eval()
    block = ens.frozen_blocks[0]
    passes = []
    block.backbone.register_forward_hook(lambda module, args, output: passes.append(args))
    texts = ["a fine film", "a dull film", "a fine film"]
    with torch.no_grad():
        first = block(texts)
        again = block(texts[::-1])
    assert len(passes) == 1 and list(block.feature_cache) == ["a fine film", "a dull film"]  # one pass, distinct texts
    torch.testing.assert_close(again, first.flip(0))
    block.CACHED_TEXTS = 2
    with torch.no_grad():
        third = block(["a third film", "a fine film"])
    assert len(passes) == 2 and list(block.feature_cache) == ["a fine film", "a dull film"]  # scored, not kept
    torch.testing.assert_close(third[1], first[0])


@pytest.mark.parametrize("kind", ["linear", "frozen_heads"])
def test_head_inputs_are_what_every_members_head_reads(kind, tiny_reward_backbone):
    from uprlhf.reward.ensembles import _classifier

    ens = _build(kind, tiny_reward_backbone)
    batch = _batch(tiny_reward_backbone)
    with torch.no_grad():
        features = ens.head_inputs(**batch)
        assert features.shape == (4, ens.model.config.hidden_size)
        assert torch.allclose(_classifier(ens.model)(features), ens(**batch), atol=1e-6)


@pytest.mark.parametrize("kind", ["independent", "lora"])
def test_kinds_without_one_shared_head_layer_name_the_kinds_that_have_one(kind, tiny_reward_backbone):
    ens = _build(kind, tiny_reward_backbone)
    with pytest.raises(ValueError, match=rf"kind '{kind}' has no one layer that every member's head reads; kinds that have: linear, frozen_heads$"):
        ens.head_inputs(**_batch(tiny_reward_backbone))


def test_multi_backbone_has_no_head_inputs(tiny_reward_backbone, tiny_policy):
    ens = _multi_backbone(tiny_reward_backbone, tiny_policy)
    with pytest.raises(ValueError, match="kind 'multi_backbone' has no one layer"):
        ens.head_inputs(**_batch(tiny_reward_backbone))

