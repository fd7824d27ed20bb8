"""Rollout engines: generate responses with per-token log-probs, behind one interface.

``hf`` runs transformers ``generate`` (CPU default, the tests); ``vllm`` runs vLLM
on a GPU and is imported only when chosen. Both take the learner's weights by name
(``policy_weights``): the LoRA adapter alone for a LoRA policy, else every weight.
Sampling is seeded per call, so a step replays identically after a resume.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from uprlhf.registry import Registry
from uprlhf.rl.config import HFRolloutConfig, PolicyConfig, RolloutConfig, VLLMRolloutConfig
from uprlhf.rl.generation import DECODE_WEIGHTS, lora_part
from uprlhf.rl.policy import PROMPT_TEMPLATES, SampledBatch, build_policy, forward_logprobs, load_policy_weights
from uprlhf.rl.weight_sync import Layout, receive
from uprlhf.seeds import derive_seed


def _backend(name: str, cls: type[RolloutEngine], *, config: type) -> type[RolloutEngine]:
    """Check that the backend's config type is tagged with its name (``rollout.backend``)."""
    if config.model_fields["backend"].default != name:
        raise TypeError(f"rollout backend {name!r}: config {config.__name__} is tagged {config.model_fields['backend'].default!r}")
    cls.config_type = config
    return cls


# ``@ROLLOUT_ENGINES.register("name", config=ItsConfig)`` on a ``RolloutEngine`` subclass.
ROLLOUT_ENGINES: Registry[type[RolloutEngine]] = Registry("rollout backend", make=_backend)


def make_rollout_engine(policy: PolicyConfig, rollout: RolloutConfig) -> RolloutEngine:
    return ROLLOUT_ENGINES.get(rollout.backend)(policy, rollout)


class RolloutEngine(ABC):
    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig):
        self.policy_cfg = policy
        self.cfg = rollout
        self.template = PROMPT_TEMPLATES[policy.prompt_template]
        self.version = 0

    @abstractmethod
    def generate(self, prompts: list[str], seed: int) -> SampledBatch:
        """One sampled response per prompt, with log-probs of the sampled tokens."""

    @abstractmethod
    def load_weights(self, weights: dict[str, Tensor], version: int) -> None:
        """Take the learner's current policy weights (tagged with the policy version)."""

    device = torch.device("cpu")

    def receive_weights(self, group, layout: Layout, version: int) -> None:
        """Take the weights from the learner's broadcast over the sync group."""
        self.load_weights(receive(group, layout, self.device), version)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {int(i) for i in ids if i is not None} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@ROLLOUT_ENGINES.register("hf", config=HFRolloutConfig)
class HFRolloutEngine(RolloutEngine):
    """transformers ``generate`` with raw logits kept, so log-probs are the policy's own (before top-p)."""

    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig):
        super().__init__(policy, rollout)
        self.model, self.tokenizer = build_policy(policy, trainable=False)
        self.device = torch.device("cuda" if rollout.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        self.eos = _eos_ids(self.model, self.tokenizer)
        self.lora = hasattr(self.model, "peft_config")
        self.merged = False
        # A LoRA adapter is merged into the weights it adapts, so generation costs what the base
        # model costs; the pristine base weights are kept so that every merge starts from them exactly.
        self.base_weights = (
            {n: p.detach().clone() for n, p in self.model.named_parameters() if ".base_layer." in n} if self.lora else {}
        )
        self.decoder = DECODE_WEIGHTS.get(rollout.decode_weights)(self.model, skip=lora_part)

    def load_weights(self, weights: dict[str, Tensor], version: int) -> None:
        if self.lora and self.merged:
            self.model.base_model.unmerge_adapter()
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, original in self.base_weights.items():
                    params[name].copy_(original)
        load_policy_weights(self.model, {k: v.to(self.device) for k, v in weights.items()})
        if self.lora:
            self.model.base_model.merge_adapter()
            self.merged = True
        else:  # full fine-tuning changed every layer a decoder may have copied
            self.decoder.refresh()
        self.version = version

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer([self.template(p) for p in prompts], return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.no_grad()  # not inference_mode: the learner trains on these tensors when it runs in-process
    def generate(self, prompts: list[str], seed: int) -> SampledBatch:
        enc = self.encode_prompts(prompts)
        torch.manual_seed(seed)
        with self.decoder.decoding():
            out = self.model.generate(
                **enc,
                do_sample=True,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                top_k=0,
                max_new_tokens=self.cfg.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self.eos),
                output_logits=True,
                return_dict_in_generate=True,
            )
        response_ids = out.sequences[:, enc["input_ids"].shape[1] :]
        logits = torch.stack(out.logits, dim=1)[:, : response_ids.shape[1]]
        logprobs = torch.log_softmax(logits.float() / self.cfg.temperature, -1)
        logprobs = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        mask = response_mask(response_ids, self.eos)
        response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, self.tokenizer.pad_token_id))
        batch = SampledBatch(  # on the CPU: it travels through the object store
            prompts=list(prompts),
            responses=[t.strip() for t in self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)],
            prompt_ids=enc["input_ids"].cpu(),
            prompt_mask=enc["attention_mask"].cpu(),
            response_ids=response_ids.cpu(),
            response_mask=mask.cpu(),
            logprobs=(logprobs * mask).cpu(),
            pad_id=self.tokenizer.pad_token_id,
        )
        if not self.decoder.exact:  # the policy's own log-probs, not the low-precision sampler's: one float32 forward
            batch.logprobs = forward_logprobs(self.model, batch, self.cfg.temperature)[0].cpu()
        return batch


def response_mask(response_ids: Tensor, eos_ids: set[int]) -> Tensor:
    """1 on tokens up to and including the first end-of-sequence token, 0 after it."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= response_ids == eos
    ended_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~ended_before).long()


# The values vLLM's LoRAConfig accepts as ``max_lora_rank`` (``MaxLoRARanks`` in vllm/config/lora.py).
_VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@ROLLOUT_ENGINES.register("vllm", config=VLLMRolloutConfig)
class VLLMRolloutEngine(RolloutEngine):
    """vLLM's V1 engine on one GPU. A LoRA policy's adapter is handed over as a new ``LoRARequest``
    per load; a full policy's weights go into the running model through ``WeightSyncExtension``
    (``uprlhf.rl.vllm_extension``), called with ``collective_rpc``.
    """

    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig):
        super().__init__(policy, rollout)
        # Engine core and worker in this process: collective_rpc then hands the extension the
        # worker's sync group and the tensors by reference, not through a pickling socket.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(
                "rollout.backend=vllm needs the vllm package on a GPU machine: pip install -e .[vllm] "
                f"({err})"
            ) from None
        from uprlhf.models import load_tokenizer, resolve

        self.tokenizer = load_tokenizer(policy.model)
        rank = policy.lora_rank or 1
        self.llm = LLM(
            model=resolve(policy.model.name_or_path),
            dtype=policy.model.dtype if policy.model.dtype != "float32" else "bfloat16",
            trust_remote_code=policy.model.trust_remote_code,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enable_lora=policy.lora_rank is not None,
            max_lora_rank=next((r for r in _VLLM_MAX_LORA_RANKS if r >= rank), rank),
            # log-probs after temperature (and top-p): at top_p=1 what the HF backend and the learner compute
            logprobs_mode="processed_logprobs",
            worker_extension_cls="uprlhf.rl.vllm_extension.WeightSyncExtension",
            seed=0,
        )
        self.device = torch.device("cuda")
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="uprlhf-lora-"))
        self.adapters = 0  # LoRARequest ids: vLLM caches an adapter by id, and a version can come twice
        self.lora_request = None

    def load_weights(self, weights: dict[str, Tensor], version: int) -> None:
        if self.policy_cfg.lora_rank is None:
            self.llm.collective_rpc("uprlhf_load_weights", args=(weights,))
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        else:
            self.lora_request = self._new_adapter(weights, version)
        self.version = version

    def receive_weights(self, group, layout: Layout, version: int) -> None:
        """A LoRA adapter is received here and saved as any other; full weights inside vLLM's worker."""
        if self.policy_cfg.lora_rank is not None:
            super().receive_weights(group, layout, version)
            return
        self.llm.collective_rpc("uprlhf_receive_weights", args=(group, layout))
        self.llm.reset_prefix_cache()
        self.version = version

    def _new_adapter(self, weights: dict[str, Tensor], version: int):
        """Save the adapter in PEFT's layout under a new id; the previous folder goes (it is never asked for again)."""
        from peft import LoraConfig
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self.adapters += 1
        target = self.adapter_dir / f"{self.adapters}-v{version}"
        target.mkdir(parents=True)
        LoraConfig(
            r=self.policy_cfg.lora_rank,
            lora_alpha=self.policy_cfg.lora_alpha,
            target_modules=self.policy_cfg.lora_target_modules,
        ).save_pretrained(target)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(target / "adapter_model.safetensors"))
        if self.lora_request is not None:
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
        return LoRARequest(f"policy-v{version}-{self.adapters}", self.adapters, str(target))

    def generate(self, prompts: list[str], seed: int) -> SampledBatch:
        from vllm import SamplingParams

        texts = [self.template(p) for p in prompts]
        params = [
            SamplingParams(
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                logprobs=0,
                seed=derive_seed(seed, "vllm request", i),
            )
            for i in range(len(texts))
        ]
        outputs = self.llm.generate(texts, params, lora_request=self.lora_request, use_tqdm=False)
        pad = self.tokenizer.pad_token_id
        prompt_ids = [list(o.prompt_token_ids) for o in outputs]
        completions = [o.outputs[0] for o in outputs]
        p_len = max(len(p) for p in prompt_ids)
        t_len = max(1, max(len(c.token_ids) for c in completions))
        batch_prompt = torch.full((len(texts), p_len), pad, dtype=torch.long)
        batch_prompt_mask = torch.zeros_like(batch_prompt)
        batch_resp = torch.full((len(texts), t_len), pad, dtype=torch.long)
        batch_resp_mask = torch.zeros_like(batch_resp)
        batch_logp = torch.zeros((len(texts), t_len))
        for i, (p, c) in enumerate(zip(prompt_ids, completions)):
            batch_prompt[i, p_len - len(p) :] = torch.tensor(p)
            batch_prompt_mask[i, p_len - len(p) :] = 1
            n = len(c.token_ids)
            batch_resp[i, :n] = torch.tensor(list(c.token_ids))
            batch_resp_mask[i, :n] = 1
            batch_logp[i, :n] = torch.tensor([lp[tok].logprob for lp, tok in zip(c.logprobs, c.token_ids)])
        return SampledBatch(
            prompts=list(prompts),
            responses=[c.text.strip() for c in completions],
            prompt_ids=batch_prompt,
            prompt_mask=batch_prompt_mask,
            response_ids=batch_resp,
            response_mask=batch_resp_mask,
            logprobs=batch_logp,
            pad_id=pad,
        )


def check_prompt_lengths(
    prompts: list[str], policy: PolicyConfig, rollout: RolloutConfig, tokenizer, limit: int | None, source: str
) -> list[str]:
    """Problems (``source:row: prompt: ...``) for prompts whose tokens plus the response exceed the context."""
    if limit is None:
        return []
    template = PROMPT_TEMPLATES[policy.prompt_template]
    lengths = [len(ids) for ids in tokenizer([template(p) for p in prompts])["input_ids"]]
    budget = limit - rollout.max_new_tokens
    return [
        f"{source}:{row}: prompt: {n} tokens + rollout.max_new_tokens={rollout.max_new_tokens} exceed the "
        f"policy's context of {limit} tokens"
        for row, n in enumerate(lengths, start=1)
        if n > budget
    ]

