"""Checkpoint files that nothing can execute, and a manifest that says a folder is whole.

State is split in two plain formats: every tensor goes into a safetensors file, and
the structure around them (dict keys, step counts, hyper-parameters) into JSON with
``{"__tensor__": key}`` placeholders. Neither format can carry code, so a planted or
tampered file can make a resume fail but never run anything (no pickle anywhere).

``write_manifest(folder)`` is called LAST, once every file of a checkpoint is in
place: it fsyncs each file, records its sha256 and size in ``MANIFEST.json``
(atomically, fsynced) and fsyncs the folder. ``verify_manifest(folder)`` lists what is
wrong with a folder; an empty list means it is exactly what was written, so a
resume can trust it (and fall back to an older checkpoint otherwise).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from uprlhf.atomic import TEMP_SUFFIX, atomic_write, fsync_directory

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20

# ---------------------------------------------------------------------------------
# state dicts as safetensors + JSON


def flatten_state(value: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into tensors and a JSON skeleton.

    Dict keys may be ``str`` or ``int`` (a torch optimiser keys its state by parameter
    index); tuples stay tuples. Anything else (arbitrary objects) is refused.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two tensors of the state would be stored as {path!r}")
            tensors[path] = obj.detach().cpu().clone().contiguous()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            items = []
            for key, item in obj.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(f"state key {key!r} at {path or '<root>'} is not a str or int")
                items.append([key, walk(item, f"{path}.{key}" if path else str(key))])
            return {"__dict__": items}
        if isinstance(obj, (list, tuple)):
            kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
            return {kind: [walk(item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(obj)]}
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"state value at {path or '<root>'} has type {type(obj).__name__}; only tensors, "
                        "numbers, strings, None, lists, tuples and dicts can be saved")

    skeleton = walk(value, prefix)
    return tensors, skeleton


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``flatten_state``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise KeyError(f"tensor {key!r} named in the JSON is missing from the safetensors file")
            return tensors[key]
        if set(skeleton) == {"__dict__"}:
            return {key: unflatten_state(item, tensors) for key, item in skeleton["__dict__"]}
        if set(skeleton) == {"__list__"}:
            return [unflatten_state(item, tensors) for item in skeleton["__list__"]]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_state(item, tensors) for item in skeleton["__tuple__"])
        if set(skeleton) == {"__float__"}:
            return float(skeleton["__float__"])
        raise ValueError(f"unknown entry in a state skeleton: {sorted(skeleton)}")
    if isinstance(skeleton, list):
        raise ValueError("a bare list in a state skeleton (lists are written as {'__list__': ...})")
    return skeleton


def save_state(stem: str | os.PathLike[str], state: Any) -> tuple[Path, Path]:
    """Write ``state`` as ``STEM.safetensors`` (tensors) and ``STEM.json`` (everything else)."""
    stem = Path(stem)
    tensors, skeleton = flatten_state(state)
    tensor_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors writes the file itself; write it beside and rename so a crash leaves no half file
    partial = tensor_path.with_name(f".{tensor_path.name}{TEMP_SUFFIX}")
    save_file(tensors, str(partial))
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, tensor_path)
    text = json.dumps({"format": "uprlhf-state", "version": 1, "state": skeleton}, allow_nan=False)
    atomic_write(json_path, lambda handle: handle.write(text), binary=False)
    fsync_directory(stem.parent)
    return tensor_path, json_path


def load_state(stem: str | os.PathLike[str]) -> Any:
    """Read what ``save_state`` wrote (safetensors + JSON only; nothing is unpickled)."""
    stem = Path(stem)
    tensor_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    for path in (tensor_path, json_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint state file {path} is missing")
    document = json.loads(json_path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != "uprlhf-state":
        raise ValueError(f"{json_path} is not a uprlhf state file")
    return unflatten_state(document["state"], load_file(str(tensor_path)))


# ---------------------------------------------------------------------------------
# manifests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every entry below ``folder`` but the manifest, as paths; symlinks included (and refused by callers)."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in dirs:
            if (base / name).is_symlink():
                out.append(base / name)
        for name in files:
            path = base / name
            if path.parent == folder and name == MANIFEST:
                continue
            out.append(path)
    return sorted(out)


def write_manifest(folder: str | os.PathLike[str]) -> Path:
    """Record sha256 and size of every file below ``folder`` in ``folder/MANIFEST.json``; call it LAST.

    Each file and directory is fsynced first, then the manifest is written atomically
    and the folder fsynced, so a manifest on disk implies the files it names are too.
    Symlinks are refused (a checkpoint holds plain files only).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    entries: dict[str, dict] = {}
    directories = {folder}
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{rel}: a checkpoint may hold plain files only, not links or special files")
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        entries[rel] = {"sha256": _sha256(path), "size": path.stat().st_size}
        directories.add(path.parent)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(directory)
    document = {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": entries}
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    path = atomic_write(folder / MANIFEST, lambda handle: handle.write(text), binary=False)
    fsync_directory(folder)
    return path


def verify_manifest(folder: str | os.PathLike[str], *, allow_extra: bool = False) -> list[str]:
    """What is wrong with ``folder`` against its manifest; ``[]`` means every recorded file is intact.

    Reported: a missing or unreadable manifest, a missing file, a size or sha256
    mismatch, a link or special file, a manifest entry outside the folder, and (unless
    ``allow_extra``) any file not in the manifest — an unexpected file in a checkpoint is
    treated as tampering or a half-written save, so the caller falls back to an older one.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return [f"{folder}: checkpoint folder is missing"]
    if not manifest.is_file():
        return [f"{folder}: {MANIFEST} is missing (the save did not finish)"]
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
        files = document["files"]
        if document.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("unexpected layout")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{folder}: {MANIFEST} is unreadable ({err})"]
    problems = []
    for rel, entry in sorted(files.items()):
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel == MANIFEST:
            problems.append(f"{rel}: manifest entry points outside the checkpoint")
            continue
        path = folder / pure
        if path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append(f"{rel}: not a plain file")
        elif not path.exists():
            problems.append(f"{rel}: missing")
        elif not isinstance(entry, dict) or path.stat().st_size != entry.get("size"):
            problems.append(f"{rel}: size mismatch")
        elif _sha256(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    if not allow_extra:
        for path in _files(folder):
            rel = path.relative_to(folder).as_posix()
            if rel not in files:
                problems.append(f"{rel}: unexpected file (not in the manifest)")
    return problems


# ---------------------------------------------------------------------------------
# step checkpoints of a run: sealed on write, verified on resume


def seal_checkpoint(final: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """``fill(partial)`` writes a checkpoint into a hidden sibling folder; then the manifest seals it and it is renamed
    to ``final``, so a kill at any point leaves either the old checkpoint or the whole new one."""
    final = Path(final)
    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fill(partial)
    write_manifest(partial)  # last: a checkpoint without a verified manifest is never resumed from
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def newest_intact(folders: Iterable[Path], on_damaged: Callable[[Path, list[str]], None]) -> Path | None:
    """The newest (last by name) folder whose manifest verifies; each damaged newer one goes to ``on_damaged`` and is skipped."""
    for folder in sorted(folders, reverse=True):
        problems = verify_manifest(folder)
        if not problems:
            return folder
        on_damaged(folder, problems)
    return None
