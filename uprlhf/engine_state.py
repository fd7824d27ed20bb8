"""Resume state of a DeepSpeed engine as tensors and plain values (no Ray here, no pickle).

The PPO learner and the SFT trainer both wrap a model in a DeepSpeed engine over
data-parallel ranks and must resume bit-identically after a kill: trainable
weights, the optimiser's moments (per parameter at ZeRO 0, over the flat
partitions at ZeRO 1-3), the scheduler, the engine's counters and every RNG.
``uprlhf.checkpoint.save_state`` turns the result into safetensors + JSON.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

STATE_FORMAT = 1


def gathered(model: torch.nn.Module, zero_stage: int):
    """A context in which every rank sees the full parameters (ZeRO-3 gathers them; otherwise nothing to do)."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return nullcontext()


def engine_state_dict(engine, params: dict[str, torch.nn.Parameter], rank: int, world_size: int, zero_stage: int, cuda: bool) -> dict:
    """Everything a bit-identical resume of this rank needs; collective under ZeRO 1-3 (every rank calls)."""
    state = {
        "format": STATE_FORMAT,
        "rank": rank,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "engine": {key: int(getattr(engine, key, 0)) for key in ENGINE_COUNTERS},
        "scheduler": engine.lr_scheduler.state_dict() if getattr(engine, "lr_scheduler", None) is not None else None,
        "rng": rng_state(cuda),
    }
    if zero_stage == 0:
        state["weights"] = {name: p.detach() for name, p in params.items()}
        state["optimizer"] = engine.optimizer.state_dict()
    else:
        state.update(_zero_state(engine, params))
    return state


def load_engine_state_dict(
    engine, params: dict[str, torch.nn.Parameter], state: dict, rank: int, world_size: int, zero_stage: int, cuda: bool, *,
    where: str
) -> None:
    """Restore what ``engine_state_dict`` returned; refuses a state of another rank layout or model."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{where}: unknown format {state.get('format')!r} (expected {STATE_FORMAT})")
    for key, mine in (("rank", rank), ("world_size", world_size), ("zero_stage", zero_stage)):
        if state.get(key) != mine:
            raise ValueError(f"{where}: saved with {key}={state.get(key)!r}, this run has {key}={mine!r}; "
                             "resume with the same learner.num_workers and learner.zero_stage")
    saved = state["weights"]
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise KeyError(f"{where}: trainable weights differ (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, p in params.items():
        if tuple(saved[name].shape) != tuple(p.shape) and zero_stage != 3:
            raise ValueError(f"{where}: {name} has shape {tuple(saved[name].shape)}, the model {tuple(p.shape)}")
    if zero_stage == 0:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        engine.optimizer.load_state_dict(state["optimizer"])
    else:
        _load_zero_state(engine, params, state, zero_stage)
    if state.get("scheduler") is not None and getattr(engine, "lr_scheduler", None) is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    for key, value in state["engine"].items():
        if key in ENGINE_COUNTERS:
            setattr(engine, key, int(value))
    set_rng_state(state["rng"], cuda)


ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def rng_state(cuda: bool) -> dict:
    """Torch CPU (and CUDA), numpy and Python RNG states as tensors and plain values."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if cuda and torch.cuda.is_available():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict, cuda: bool) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch_cpu"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if cuda and "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["torch_cuda"]))


def _base_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _zero_state(engine, params: dict[str, torch.nn.Parameter]) -> dict:
    """ZeRO 1-3: the full fp32 weights (DeepSpeed's tensor-fragment API; collective, every rank
    calls) and this rank's inner torch optimiser state over its flat partition (Adam moments,
    step counts, hyper-parameters), which is why a resume needs the same world size."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in params.items()}
    base = _base_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:  # ZeRO 1/2: the inner optimiser's own state dict is over the flat partitions
        return {"weights": weights, "optimizer": base.state_dict()}
    _check_zero3_in_memory(engine.optimizer)  # ZeRO 3 empties param_groups between steps: state per sub-group
    return {
        "weights": weights,
        "zero3_optimizer": {
            "hyper": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
            "sub_groups": [dict(base.state.get(flat, {})) for flat in flats],
        },
    }


def _check_zero3_in_memory(optimizer) -> None:
    if getattr(optimizer, "offload_optimizer", False) or getattr(optimizer, "swap_optimizer", False):
        raise NotImplementedError("learner save/load under ZeRO 3 with optimizer offload or swapping is not supported")


def _load_zero_state(engine, params: dict[str, torch.nn.Parameter], state: dict, stage: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    saved = state["weights"]
    base = _base_optimizer(engine)
    if "zero3_optimizer" in state:
        _check_zero3_in_memory(engine.optimizer)
        flats, entry = engine.optimizer.fp32_partitioned_groups_flat, state["zero3_optimizer"]
        if len(entry["sub_groups"]) != len(flats) or len(entry["hyper"]) != len(base.param_groups):
            raise ValueError("saved ZeRO-3 optimiser state has another number of (sub-)groups than this one")
        for group, hyper in zip(base.param_groups, entry["hyper"]):
            group.update(hyper)
        for flat, sub in zip(flats, entry["sub_groups"]):
            base.state[flat] = {
                k: v.to(flat.device) if isinstance(v, torch.Tensor) and k != "step" else v for k, v in sub.items()
            }
    else:
        base.load_state_dict(state["optimizer"])
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked") and _base_optimizer(engine).state:
        engine.optimizer._hp_optimizer_states_linked = False  # ZeRO 1/2: re-point the fragment views
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():  # the fp32 master partitions, then the module's own weights
        device = getattr(p, "ds_tensor", p).device
        safe_set_full_fp32_param(p, saved[name].to(device, torch.float32))
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name].to(p.device, p.dtype))
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.device, p.dtype))

