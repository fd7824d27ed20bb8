"""The reward stage (``run_train_reward``): an ensemble of each configured kind, trained with Ray Train + DeepSpeed, then evaluated; ``python -m jobs.train_reward`` is its command line.

Placement: per kind, one Ray Train ``TorchTrainer`` of ``train.num_workers`` DeepSpeed
ranks (gloo on CPU, NCCL on GPU). The loop: train → copy its checkpoints to
``DIR/checkpoints/<kind>/`` → evaluate on held-out pairs and OOD responses → add
``kinds.<kind>`` to ``summary.json``. A kind already finished in DIR is skipped,
so a killed run resumes at the kind it was training.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from jobs.common import MetricsLog, atomic_write_text, log, read_json, start_ray, write_json
from uprlhf.config import ConfigError, TrainRewardConfig, fingerprint
from uprlhf.data.loaders import DataError, Loaded, load_preferences, load_responses
from uprlhf.paths import DATA_SUFFIXES, DataPaths

FIGURES = ("accuracy", "ece", "ood_auroc", "diversity", "trainable_params", "train_seconds")


def load_reward_data(cfg: TrainRewardConfig, data_dir: Path) -> dict[str, Loaded]:
    """Validate all three files before any actor starts; one message lists every bad row."""
    loaders = {"reward_train": load_preferences, "reward_test": load_preferences, "ood": load_responses}
    loaded, problems = {}, []
    for name, loader in loaders.items():
        try:
            path = DataPaths(data_dir).find(name)  # any canonical format: .parquet, .jsonl, .csv, a datasets folder
            loaded[name] = loader(path, max_chars=cfg.max_chars, skip_bad=cfg.skip_bad_rows)
        except DataError as err:
            problems.extend(err.problems)
    if problems:
        raise DataError(problems)
    return loaded


def lora_problems(cfg: TrainRewardConfig, prefix: str = "") -> list[str]:
    """LoRA targets the backbone has no module for, when a configured kind puts LoRA on it (checked before Ray starts)."""
    from uprlhf.models import lora_target_problem
    from uprlhf.reward.ensembles import ensemble_class

    # The LoRA kinds are the ones that attach adapters to the backbone.
    lora_kinds = [kind for kind in cfg.kinds if hasattr(ensemble_class(kind), "attach_adapters")]
    if not lora_kinds:
        return []
    field = f"{prefix}ensemble.lora_target_modules"
    problem = lora_target_problem(cfg.backbone, cfg.ensemble.lora_target_modules, field, reward=True)
    return [f"{problem} (kinds {', '.join(lora_kinds)} put LoRA on them)"] if problem else []


def training_fingerprint(cfg: TrainRewardConfig, data_dir: Path) -> str:
    """What a finished kind was trained with: every setting but the list of kinds, plus the data."""
    settings = cfg.model_copy(update={"kinds": [], "data_dir": None})
    data = read_json(data_dir / "manifest.json").get("fingerprint") or ",".join(
        f"{p.relative_to(data_dir)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in _data_files(data_dir)
    )
    return f"{fingerprint(settings)}-{data}"


def _data_files(data_dir: Path) -> list[Path]:
    """The data files of a folder without a manifest: every canonical file, and the files of its saved datasets."""
    files = [p for p in data_dir.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES and p.name != "manifest.json"]
    for name in ("reward_train", "reward_test", "ood"):
        if (data_dir / name).is_dir():
            files += [p for p in (data_dir / name).rglob("*") if p.is_file()]
    return sorted(files)


def pair_budget_problem(cfg: TrainRewardConfig, data_dir: Path, usable: int | None = None) -> str | None:
    """One line when ``train.max_pairs`` asks for more than the ``usable`` training pairs (read from ``data_dir``
    when not given), else None; a study checks every cell with it before the first one trains."""
    budget = cfg.train.max_pairs
    if budget is None:
        return None
    if usable is None:
        usable = len(load_reward_data(cfg, data_dir)["reward_train"].rows)
    if budget <= usable:
        return None
    return f"{DataPaths(data_dir).find('reward_train')}: {usable} usable pairs, fewer than reward.train.max_pairs={budget}"


def train_worker(config: dict) -> None:
    """One Ray Train rank: build the ensemble, run the shared loop, report checkpoints from rank 0."""
    import ray.train
    import torch

    from uprlhf.config import EnsembleConfig, ModelConfig, TrainConfig
    from uprlhf.reward.ensembles import ensemble_class
    from uprlhf.models import load_tokenizer
    from uprlhf.reward.training import deepspeed_engine, train_ensemble

    train_cfg = TrainConfig(**config["train"])
    # The driver forwards its DS_ACCELERATOR (cpu under `make`); a GPU rank must not inherit it.
    os.environ["DS_ACCELERATOR"] = "cuda" if train_cfg.use_gpu else "cpu"
    if not train_cfg.use_gpu:
        torch.set_num_threads(max(1, int(train_cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    backbone = ModelConfig(**config["backbone"])
    ens_cfg = EnsembleConfig(**config["ensemble"])
    ensemble = ensemble_class(config["kind"])(backbone, ens_cfg, train_cfg.lr, train_cfg.head_lr, train_cfg.seed)
    tokenizer = load_tokenizer(backbone)

    def on_checkpoint(checkpoint) -> None:
        metrics = {"phase": checkpoint.phase, "step": checkpoint.step, "loss": checkpoint.history[-1]["loss"]}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            info = checkpoint.write(tmp)
            write_json(Path(tmp) / "trainer_state.json", {**info, "history": checkpoint.history})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    train_ensemble(
        ensemble,
        tokenizer,
        config["rows"],
        train_cfg,
        warmup_fraction=ens_cfg.warmup_fraction,
        bootstrap=ens_cfg.bootstrap,
        rank=rank,
        world_size=world,
        make_engine=deepspeed_engine(train_cfg.zero_stage, train_cfg.batch_size),
        on_checkpoint=on_checkpoint,
    )


def train_kind(cfg: TrainRewardConfig, kind: str, rows: list[dict], out: Path) -> list[Path]:
    """Fit one kind on Ray Train; returns its checkpoint folders, oldest first, the last one final."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.train_backend import LoopbackTorchConfig

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "kind": kind,
            "rows": rows,
            "backbone": cfg.backbone.model_dump(),
            "ensemble": cfg.ensemble_for(kind).model_dump(),
            "train": cfg.train.model_dump(),
        },
        torch_config=LoopbackTorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"reward-{kind}-{int(time.time())}",
            storage_path=str(out / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    target_root = out / "checkpoints" / kind
    staging = Path(tempfile.mkdtemp(dir=out / "checkpoints", prefix=f".{kind}-"))
    folders = []
    ordered = sorted(result.best_checkpoints, key=lambda pair: pair[1]["step"])
    for i, (checkpoint, _metrics) in enumerate(ordered):
        with checkpoint.as_directory() as src:
            shutil.copytree(src, staging / f"ckpt_{i}")
        folders.append(f"ckpt_{i}")
    if not folders:
        raise RuntimeError(f"training {kind} reported no checkpoint")
    shutil.copytree(staging / folders[-1], staging / "final")
    shutil.rmtree(target_root, ignore_errors=True)
    staging.rename(target_root)
    shutil.rmtree(out / "ray_train", ignore_errors=True)
    return [target_root / f for f in folders]


def format_table(kinds: dict[str, dict]) -> str:
    """The ensemble table as Markdown, one row per kind."""
    header = "| kind | " + " | ".join(FIGURES) + " |"
    lines = [header, "|" + "---|" * (len(FIGURES) + 1)]
    for kind, figures in kinds.items():
        cells = []
        for name in FIGURES:
            value = figures.get(name)
            cells.append("–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_train_reward(cfg: TrainRewardConfig, out: Path) -> dict:
    """Train, evaluate and tabulate every kind not already done in ``out``."""
    import torch

    from transformers import AutoTokenizer

    from uprlhf.reward.ensembles import RewardEnsemble, write_member_stats
    from uprlhf.reward.evaluation import evaluate, member_stats
    from uprlhf.reward.training import TOKENIZER_DIR, pair_budget

    data_dir = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    problems = lora_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        data = load_reward_data(cfg, data_dir)
    except DataError as err:
        raise DataError([f"bad reward data:\n{err}"]) from None
    if len(data["reward_train"].rows) < 2:
        raise DataError([f"{DataPaths(data_dir).find('reward_train')}: {len(data['reward_train'].rows)} usable pair(s); need at least 2"])
    usable = data["reward_train"].rows
    problem = pair_budget_problem(cfg, data_dir, len(usable))
    if problem:
        raise DataError([problem])
    pairs = [usable[i] for i in pair_budget(len(usable), cfg.train.max_pairs, cfg.train.seed)]
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    summary = read_json(out / "summary.json")
    kinds = summary.setdefault("kinds", {})
    summary["skipped_rows"] = {name: loaded.skipped for name, loaded in data.items()}
    trained_by = training_fingerprint(cfg, data_dir)
    todo = [
        k
        for k in cfg.kinds
        if kinds.get(k, {}).get("trained_by") != trained_by or not (out / "checkpoints" / k / "final").exists()
    ]
    if todo:
        start_ray()
    metrics = MetricsLog(out)
    for n, kind in enumerate(todo, 1):
        log.info("%s (%d/%d): training K=%d on %d pairs", kind, n, len(todo), cfg.ensemble.k, len(pairs))
        started = time.perf_counter()
        folders = train_kind(cfg, kind, pairs, out)
        stats = read_json(folders[-1] / "trainer_state.json")
        for folder in folders:
            for record in read_json(folder / "trainer_state.json")["history"]:
                metrics.write({"kind": kind, **record}, f"reward/{kind}/{record['phase']}", record["step"])
        torch.set_num_threads(os.cpu_count() or 1)
        final = out / "checkpoints" / kind / "final"
        ensemble, tokenizer = RewardEnsemble.load(final), AutoTokenizer.from_pretrained(final / TOKENIZER_DIR)
        ensemble.member_stats = member_stats(ensemble, tokenizer, pairs, max_length=cfg.train.max_length, seed=cfg.train.seed)
        write_member_stats(final, ensemble.member_stats)
        figures = evaluate(
            ensemble, tokenizer, data["reward_test"].rows, data["ood"].rows, max_length=cfg.train.max_length
        )
        figures.update(
            train_pairs=len(pairs),
            trainable_params=stats["trainable_params"],
            member_params=stats["member_params"],
            train_seconds=stats["train_seconds"],
            wall_seconds=time.perf_counter() - started,
            checkpoints=[str(f.relative_to(out)) for f in folders],
            trained_by=trained_by,
        )
        kinds[kind] = figures
        write_json(out / "summary.json", summary)
        log.info("%s: %s", kind, ", ".join(f"{k}={figures[k]:.3f}" for k in ("accuracy", "ece", "ood_auroc")))
    metrics.close()
    table = format_table({k: kinds[k] for k in cfg.kinds if k in kinds})
    atomic_write_text(out / "ensemble_table.md", table + "\n")
    write_json(out / "summary.json", summary)
    log.info("ensembles:\n%s", table)
    return summary
