"""DeepSpeed JIT-builds its ops with whichever ``ninja`` is first on PATH.

Two ninja versions (the venv's and the system's) each rebuild the other's build
from scratch (~35 s for the CPU shm comm op), so every process that may build or
load an op puts its own interpreter's tools first, however it was started: from
an activated venv, by ``make``, by a Ray worker or by ``python`` named by its path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def interpreter_tools_first() -> None:
    """Put the running interpreter's ``bin`` folder first on PATH when it holds a ``ninja``; else leave PATH alone."""
    tools = Path(sys.executable).parent
    if not (tools / "ninja").is_file():
        return
    entries = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p and p != str(tools)]
    os.environ["PATH"] = os.pathsep.join([str(tools), *entries])
