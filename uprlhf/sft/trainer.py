"""One data-parallel rank of supervised fine-tuning: the policy in a DeepSpeed engine (no Ray here).

The policy is built exactly as the PPO learner builds it (``build_policy``), LoRA or
every weight, and trained on the response tokens of (prompt, response) examples.
Resume state goes through ``uprlhf.engine_state`` like the PPO learner's; the result
is exported twice: the PEFT adapter (LoRA runs) and a merged Hugging Face model that
any job loads as ``policy.model`` (and as its reference policy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from uprlhf.checkpoint import load_state, save_state
from uprlhf.engine_state import engine_state_dict, gathered, load_engine_state_dict
from uprlhf.reward.training import deepspeed_engine
from uprlhf.rl.policy import PROMPT_TEMPLATES, build_policy, load_policy_weights, policy_weights
from uprlhf.seeds import derive_seed
from uprlhf.sft.config import SFTConfig
from uprlhf.sft.data import IGNORE, collate

STATE_DIR = "learner"  # per-rank resume state: rank_{r}.safetensors + rank_{r}.json
ADAPTER_DIR = "adapter"  # the PEFT adapter of a LoRA run
POLICY_DIR = "policy"  # the merged Hugging Face model (safetensors) with its tokenizer


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, rank: int, world_size: int, total_steps: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        torch.manual_seed(derive_seed(cfg.seed, "sft init"))
        self.model, self.tokenizer = build_policy(cfg.policy, trainable=True)
        self.template = PROMPT_TEMPLATES.get(cfg.policy.prompt_template)
        self.device = torch.device("cuda" if cfg.learner.use_gpu else "cpu")
        self.model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * min(s, total_steps) / max(1, total_steps))
        make = deepspeed_engine(cfg.learner.zero_stage, cfg.batch_size // world_size, cfg.max_grad_norm)
        self.engine = make(self.model, optimizer, scheduler)

    def train_step(self, examples: list[dict[str, list[int]]]) -> dict:
        """One optimiser step on this rank's examples; DeepSpeed averages the gradients over ranks.

        Returns the mean token loss of the response tokens here, their count and the learning rate.
        """
        batch = {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}
        self.model.train()
        loss = self.engine(**batch).loss
        self.engine.backward(loss)
        lr = self.engine.get_lr()[0]
        self.engine.step()
        return {"loss": loss.item(), "response_tokens": float((batch["labels"] != IGNORE).sum()), "lr": lr}

    @torch.no_grad()
    def eval_loss(self, examples: list[dict[str, list[int]]], batch_size: int) -> tuple[float, float]:
        """Summed token loss and token count of ``examples`` under the current weights (for a held-out mean)."""
        self.model.eval()
        total, tokens = 0.0, 0.0
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(self.device) for k, v in collate(examples[start : start + batch_size], self.tokenizer.pad_token_id).items()}
            n = float((batch["labels"][:, 1:] != IGNORE).sum())
            total += self.engine(**batch).loss.item() * n
            tokens += n
        return total, tokens

    # --- checkpoints ---------------------------------------------------------------

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def save(self, path: str | Path) -> None:
        """This rank's resume state under ``learner/``; every rank calls it (collective under ZeRO 1-3)."""
        learner = self.cfg.learner
        state = engine_state_dict(self.engine, self._trainable(), self.rank, self.world_size, learner.zero_stage, learner.use_gpu)
        save_state(Path(path) / STATE_DIR / f"rank_{self.rank}", state)

    def load(self, path: str | Path) -> None:
        stem = Path(path) / STATE_DIR / f"rank_{self.rank}"
        if not stem.with_name(stem.name + ".json").is_file():
            raise FileNotFoundError(f"{stem}.json is missing: no SFT state for rank {self.rank} of {self.world_size} in {path}")
        learner = self.cfg.learner
        load_engine_state_dict(self.engine, self._trainable(), load_state(stem), self.rank, self.world_size,
                               learner.zero_stage, learner.use_gpu, where=f"SFT state of rank {self.rank}")

    def export(self, path: str | Path) -> None:
        """Rank 0 writes ``adapter/`` (LoRA runs) and ``policy/``, the merged model with its tokenizer; every rank calls it."""
        path = Path(path)
        with gathered(self.model, self.cfg.learner.zero_stage):
            if self.rank != 0:
                return
            weights = policy_weights(self.model)
            if hasattr(self.model, "peft_config"):
                self.model.save_pretrained(path / ADAPTER_DIR, safe_serialization=True)
        merged = merged_policy(self.cfg, weights)
        merged.save_pretrained(path / POLICY_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(path / POLICY_DIR)


def merged_policy(cfg: SFTConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh CPU copy of the policy with the trained weights in, the LoRA folded into the base weights."""
    model, _ = build_policy(cfg.policy, trainable=False)
    load_policy_weights(model, weights)
    return model.merge_and_unload() if hasattr(model, "peft_config") else model
