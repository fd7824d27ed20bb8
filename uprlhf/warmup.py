"""One-time set-up run by `make setup`: the work that would otherwise slow every first run.

- JIT-builds DeepSpeed's CPU shared-memory comm op into TORCH_EXTENSIONS_DIR (~40 s once);
- converts the packaged SmolLM2 GGUF to safetensors in the cache (~40 s once).
"""

from __future__ import annotations

import os
import time

from uprlhf.jit import interpreter_tools_first


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    interpreter_tools_first()
    started = time.perf_counter()
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    print(f"[warmup] DeepSpeed shm comm op ready ({time.perf_counter() - started:.0f}s)", flush=True)

    from uprlhf.models import smollm2_dir

    started = time.perf_counter()
    print(f"[warmup] SmolLM2 safetensors at {smollm2_dir()} ({time.perf_counter() - started:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
