"""Full-weight updates inside vLLM's worker, where vLLM's own API cannot reach.

vLLM's V1 engine keeps the model inside its worker object. The supported way in is a
worker extension: ``LLM(worker_extension_cls="uprlhf.rl.vllm_extension.WeightSyncExtension")``
makes vLLM add this class to its worker's bases, and ``LLM.collective_rpc(name, args=...)``
then calls the method named ``name`` with ``self`` being that worker (``self.model_runner.model``,
``self.device``). The V0 way, reaching through ``llm.llm_engine.model_executor``, is gone in V1.

The rollout engine runs vLLM in its own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one
GPU), so ``collective_rpc`` passes its arguments by reference: the learner's tensors as they
came, and the rollout worker's weight-sync process group, which could not be pickled.

This module imports nothing from vllm: vLLM resolves the class by name, and the module
must import and be tested on a CPU machine without vllm. vLLM refuses an extension with
an attribute its worker already has, so the methods carry an ``uprlhf_`` prefix and the
class has no other attributes.
"""

from __future__ import annotations

from torch import Tensor

from uprlhf.rl.weight_sync import Layout, receive


class WeightSyncExtension:
    """Mixed into vLLM's worker by vLLM; called only through ``LLM.collective_rpc``."""

    def uprlhf_load_weights(self, weights: dict[str, Tensor]) -> None:
        """Every policy weight, by its transformers name: vLLM's loader maps the names (q, k, v into qkv)
        and copies into the model's own tensors, so captured CUDA graphs stay valid."""
        self.model_runner.model.load_weights(weights.items())

    def uprlhf_receive_weights(self, group, layout: Layout) -> None:
        """Receive learner rank 0's broadcast over the sync group straight onto this GPU, then load it."""
        self.uprlhf_load_weights(receive(group, layout, self.device))
