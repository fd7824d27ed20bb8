import math

import torch

from uprlhf.reward.priors import RandomPrior

IDS = torch.tensor([[5, 9, 40000, 0], [7, 7, 7, 7]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])


def test_a_member_prior_is_its_own_whatever_the_ensemble_size():
    three, five = RandomPrior(3, seed=4), RandomPrior(5, seed=4)
    assert three(IDS, MASK).shape == (2, 3) and five(IDS, MASK).shape == (2, 5)
    torch.testing.assert_close(three(IDS, MASK), five(IDS, MASK)[:, :3])
    assert not torch.allclose(RandomPrior(3, seed=5)(IDS, MASK), three(IDS, MASK))
    assert list(dict(three.named_parameters())) == []  # buffers only: nothing for an optimiser


def test_the_prior_pools_unmasked_tokens_as_sum_over_root_length_then_one_tanh_layer():
    prior = RandomPrior(2, seed=0)
    table = prior.embedding[1]
    pooled = (table[5] + table[9] + table[40000 % table.shape[0]]) / math.sqrt(3)  # the padded 0 is left out
    expected = torch.tanh(pooled @ prior.hidden[1]) @ prior.out[1]
    torch.testing.assert_close(prior.column(IDS, MASK, 1)[0], expected)
    changed_padding = IDS.clone()
    changed_padding[0, 3] = 123
    torch.testing.assert_close(prior(changed_padding, MASK), prior(IDS, MASK))
    # one token four times: its vector times 4/√4, further out than distinct tokens would go
    repeated = torch.tanh(2 * table[7] @ prior.hidden[1]) @ prior.out[1]
    torch.testing.assert_close(prior.column(IDS, MASK, 1)[1], repeated)
