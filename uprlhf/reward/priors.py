"""Randomized prior functions (Osband, Aslanides & Cassirer 2018) for any ensemble kind.

Member k's reward becomes r_k(x) = f_k(x) + β·p_k(x), where p_k is a fixed random
network that is never trained. Training fits f_k so that r_k matches the
preferences where there is data, so the members agree there; away from the data
nothing pins the sum down and the members keep their priors' disagreement. That
is the behaviour a reward ensemble needs and fine-tuning seeds alone do not give
when every member shares one pretrained backbone and one error.

p_k reads the tokens only, through its own seeded embedding table (token ids
hashed into ``BUCKETS`` rows), pooled as sum/√T so that T distinct tokens give a
unit-scale vector whatever the length, then one tanh layer and a linear output.
Member k's prior depends on (seed, k) only, so it is the same in any K.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from uprlhf.seeds import derive_seed

BUCKETS = 16384
WIDTH = 32


class RandomPrior(nn.Module):
    """K fixed random networks of the tokens, [B, T] → [B, K]; buffers, so no optimiser ever sees them."""

    def __init__(self, k: int, seed: int, buckets: int = BUCKETS, width: int = WIDTH):
        super().__init__()
        embedding, hidden, out = [], [], []
        for member in range(k):
            gen = torch.Generator().manual_seed(derive_seed(seed, "random prior", member))
            embedding.append(torch.randn(buckets, width, generator=gen))
            hidden.append(torch.randn(width, width, generator=gen) / math.sqrt(width))
            out.append(torch.randn(width, generator=gen) / math.sqrt(width))
        self.register_buffer("embedding", torch.stack(embedding))
        self.register_buffer("hidden", torch.stack(hidden))
        self.register_buffer("out", torch.stack(out))

    def column(self, input_ids: Tensor, attention_mask: Tensor, k: int) -> Tensor:
        """Member k's prior, [B]."""
        mask = attention_mask.to(self.embedding.dtype).unsqueeze(-1)
        tokens = self.embedding[k][input_ids % self.embedding.shape[1]] * mask
        pooled = tokens.sum(1) / mask.sum(1).clamp(min=1.0).sqrt()
        return torch.tanh(pooled @ self.hidden[k]) @ self.out[k]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return torch.stack([self.column(input_ids, attention_mask, k) for k in range(self.embedding.shape[0])], 1)
