import math

import pytest
import torch

from uprlhf.rl.best_of_n import best_of_n, best_of_n_kl


def test_kl_of_best_of_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_picks_the_highest_shaped_reward_among_the_first_n():
    # one prompt, 3 samples, 2 members: sample 2 has the best mean but members disagree on it
    members = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 4.0]]])
    gold = torch.tensor([[0.1, 0.5, -1.0]])
    plain = best_of_n(members, gold, [1, 2, 3], "mean", {})
    assert [plain[n]["gold"] for n in (1, 2, 3)] == [pytest.approx(0.1), pytest.approx(0.5), pytest.approx(-1.0)]
    assert plain[3]["proxy"] == pytest.approx(2.0) and plain[3]["uncertainty"] == pytest.approx(2.0)
    cautious = best_of_n(members, gold, [3], "lcb", {"lam": 1.0})
    assert cautious[3]["gold"] == pytest.approx(0.5)  # m − u: 1.0 beats 2.0 − 2.0


def test_up_rlhf_centres_on_the_mean_uncertainty_and_var_kl_reduces_to_the_mean():
    members = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 4.0]]])
    gold = torch.tensor([[0.1, 0.5, -1.0]])
    assert best_of_n(members, gold, [3], "up_rlhf", {"beta": 1.0})[3]["gold"] == pytest.approx(0.5)
    assert best_of_n(members, gold, [3], "var_kl", {"beta": 5.0})[3]["gold"] == pytest.approx(-1.0)


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="best-of-4 needs 4"):
        best_of_n(torch.zeros(2, 3, 2), torch.zeros(2, 3), [4], "mean", {})
