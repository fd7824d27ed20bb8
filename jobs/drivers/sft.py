"""The SFT stage (``run_sft``): the policy fine-tuned on prompt/response data by a DeepSpeed learner group; ``python -m jobs.sft`` is its command line.

Placement: W learner ranks (``SFTWorker``, gloo on CPU, NCCL on GPU) in one placement
group. The loop: validate and encode every row before Ray starts → held-out loss →
one ``train_step(step)`` per optimiser step → a sealed checkpoint every
``checkpoint_every`` steps → held-out loss → export ``DIR/policy`` (the merged Hugging
Face model the RL jobs load as ``policy.model``, hence also as their reference
policy) and, for LoRA, ``DIR/adapter`` (PEFT). Started again on the same DIR it
resumes from the newest intact checkpoint; a finished run is not trained again.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import ray
from tqdm import tqdm

from actors.placement import sft_plan
from actors.sft_learner import SFTWorker
from jobs.common import MetricsLog, keep_metrics_through, log, read_json, read_records, start_ray, write_config, write_json
from uprlhf.checkpoint import newest_intact, seal_checkpoint, write_manifest
from uprlhf.config import ConfigError, fingerprint
from uprlhf.data.loaders import DataError, load_responses
from uprlhf.models import load_tokenizer
from uprlhf.paths import DataPaths, RunPaths
from uprlhf.rl.policy import PROMPT_TEMPLATES
from uprlhf.seeds import derive_seed
from uprlhf.sft.config import SFTConfig
from uprlhf.sft.data import encode_rows, steps_per_epoch
from uprlhf.sft.trainer import ADAPTER_DIR, POLICY_DIR

STATE_FILE = "sft_state.json"  # in each checkpoint: the step it follows and the config it was trained with
KEEP_CHECKPOINTS = 2


def sft_data_path(cfg: SFTConfig, out: Path) -> Path:
    """``data_file``, else the ``sft`` data of ``data_dir`` (default OUTPUT_DIR/data)."""
    if cfg.data_file:
        return Path(cfg.data_file)
    try:
        return DataPaths(Path(cfg.data_dir) if cfg.data_dir else RunPaths(out).data.root).find("sft")
    except DataError as err:
        raise DataError([*err.problems, "jobs.prepare_data writes it with sft_completions_per_prompt >= 1 (data.sft_completions_per_prompt "
                         "in jobs.pipeline); or set data_file to any prompt/response file"]) from None


def load_examples(cfg: SFTConfig, out: Path) -> tuple[list[dict], list[dict], dict]:
    """Training and held-out examples, every bad row reported in one DataError before any actor starts."""
    path = sft_data_path(cfg, out)
    loaded = load_responses(path, max_chars=cfg.max_chars, skip_bad=cfg.skip_bad_rows)
    tokenizer = load_tokenizer(cfg.policy.model)
    examples = encode_rows(tokenizer, PROMPT_TEMPLATES.get(cfg.policy.prompt_template), loaded.rows, cfg.max_length, str(path))
    order = list(range(len(examples)))
    random.Random(derive_seed(cfg.seed, "sft held out")).shuffle(order)
    n_eval = int(len(examples) * cfg.eval_fraction)
    held_out, train = [examples[i] for i in order[:n_eval]], [examples[i] for i in order[n_eval:]]
    if not train:
        raise DataError([f"{path}: {len(examples)} example(s) leave none for training after eval_fraction={cfg.eval_fraction}"])
    return train, held_out, {"file": str(path), "examples": len(examples), "skipped_rows": loaded.skipped, "held_out": n_eval}


def trained_with(cfg: SFTConfig, data: dict) -> str:
    """What a checkpoint's steps depend on: every setting but how often to checkpoint, and the data file."""
    source = Path(data["file"])
    stamp = read_json(source.parent / "manifest.json").get("fingerprint") if source.is_file() else None
    if stamp is None:  # a file of the user's own: its size and time stand for its content
        stamp = f"{source.stat().st_size}:{source.stat().st_mtime_ns}" if source.is_file() else str(source)
    return f"{fingerprint(cfg.model_copy(update={'checkpoint_every': 1}))}-{data['examples']}-{stamp}"


def run_sft(cfg: SFTConfig, out: Path) -> dict:
    """Fine-tune (resuming if ``out`` holds a checkpoint) and export; returns the run's summary."""
    paths = RunPaths(out)
    train, held_out, data = load_examples(cfg, out)
    key = trained_with(cfg, data)
    write_config(out, cfg)
    summary = read_json(paths.summary)
    if summary.get("trained_with") == key and (out / POLICY_DIR / "config.json").is_file():
        log.info("%s already holds this SFT policy; nothing to do", out / POLICY_DIR)
        return summary
    total = cfg.epochs * steps_per_epoch(len(train), cfg.batch_size)
    start_ray()
    placement = sft_plan(cfg).reserve("sft")
    try:
        learner = placement.group("learner", SFTWorker, SFTWorker.arguments(cfg, ray.put(train), total))
        learner.setup(*learner.rendezvous())
        done = resume(learner, paths, key)
        if done < 0:
            summary = {"data": data, "steps": total, "eval_loss_start": learner.eval_loss(held_out) if held_out else None}
            write_json(paths.summary, summary)
        summary = read_json(paths.summary)
        keep_metrics_through(paths.metrics, done)
        metrics = MetricsLog(out)
        started = time.perf_counter()
        for step in tqdm(range(done + 1, total), desc="[sft]", unit="step", initial=done + 1, total=total, dynamic_ncols=True):
            stats, seconds = learner.train_step(step)
            metrics.write({"step": step, "epoch": step // (total // cfg.epochs), **stats, "seconds_train": seconds}, "sft", step)
            if (step + 1) % cfg.checkpoint_every == 0 or step == total - 1:
                checkpoint(learner, paths, step, key)
        metrics.close()
        summary["eval_loss_final"] = learner.eval_loss(held_out) if held_out else None
        export(learner, out)
    finally:
        placement.release()
    records = read_records(out)
    summary.update(
        trained_with=key,
        loss_first=records[0]["loss"] if records else None,
        loss_last=records[-1]["loss"] if records else None,
        train_seconds=time.perf_counter() - started,
        policy=str(out / POLICY_DIR),
        adapter=str(out / ADAPTER_DIR) if cfg.policy.lora_rank is not None else None,
    )
    write_json(paths.summary, summary)
    log.info("SFT done: held-out loss %s -> %s; policy in %s", summary["eval_loss_start"], summary["eval_loss_final"], out / POLICY_DIR)
    return summary


def resume(learner, paths: RunPaths, key: str) -> int:
    """Load the newest intact checkpoint; returns the last step it holds (-1: none). Refuses one of another config."""
    def damaged(folder: Path, problems: list[str]) -> None:
        log.warning("SFT checkpoint %s is damaged (%s); trying the one before it", folder, "; ".join(problems[:3]))

    folder = newest_intact(paths.checkpoints.glob("step_*"), damaged)
    if folder is None:
        return -1
    state = read_json(folder / STATE_FILE)
    if state.get("trained_with") != key:
        raise ConfigError(
            f"{paths.root} holds an SFT run of another config or data ({folder.name}); resume it with its own config.yaml, "
            "use a new --output-dir, or pass --force-new-config to move the old run aside"
        )
    learner.load(str(folder))
    log.info("SFT: resuming after step %d from %s", state["step"], folder.name)
    return state["step"]


def checkpoint(learner, paths: RunPaths, step: int, key: str) -> None:
    def fill(partial: Path) -> None:
        learner.save(str(partial))
        write_json(partial / STATE_FILE, {"step": step, "trained_with": key})

    seal_checkpoint(paths.step_checkpoint(step), fill)
    for old in sorted(paths.checkpoints.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def export(learner, out: Path) -> None:
    """The merged policy (and adapter) into place atomically: written beside, sealed, then renamed in."""
    staging = out / ".export.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    learner.export(str(staging))
    for name in (POLICY_DIR, ADAPTER_DIR):
        if (staging / name).is_dir():
            write_manifest(staging / name)
            shutil.rmtree(out / name, ignore_errors=True)
            (staging / name).rename(out / name)
    shutil.rmtree(staging, ignore_errors=True)
