"""Step 3: PPO against a reward ensemble, its uncertainty shaped into the reward by a named penalty.

    python -m jobs.ppo --config jobs/configs/ppo.yaml --output-dir DIR [penalty.name=up_rlhf ...]

Placement: one placement group; bundles for R rollout workers, the reward scorer
(ensemble + reference policy), W DeepSpeed learner ranks and, with
``selector.strategy`` set, the selector; a zero-CPU replay buffer. The loop, per
step: publish a refined ensemble if the selector finished one → generate → score →
shape (penalty) → PPO update → sync weights → gold evaluation every ``gold_every``
steps → replay buffer, metrics, gauges, alarm → hand new replay rows to the
selector every ``selector.every`` steps (it works beside the loop, never blocking
a step) → checkpoint. Started again on the same DIR, it resumes from the last
checkpoint; a rollout worker or scorer that dies is replaced and its stage retried.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from jobs.common import MetricsLog, atomic_write_text, fail, parse, read_json, start_ray, write_json
from uprlhf.rl.alarm import HackingAlarm
from uprlhf.config import PolicyConfig, RLConfig, SampleAndScoreConfig, to_yaml
from uprlhf.data.loaders import DataError, load_preferences, load_prompts
from uprlhf.data.gold import get_gold_scorer
from uprlhf.rl.learner import LearnerBatch
from uprlhf.rl.penalties import ensemble_stats, penalize_in_run
from uprlhf.rl.policy import SampledBatch
from uprlhf.rl.ppo import AdaptiveKLController, RunningMean

STAGES = ("generate", "score", "train", "sync", "evaluate")
EVAL_SEED = 10**9  # held-out prompts are sampled with the same seed at every evaluation
KEEP_CHECKPOINTS = 2
PLACEMENT_TIMEOUT_S = 300


@dataclass
class Inputs:
    """Everything validated before any actor starts."""

    train_prompts: list[str]
    eval_prompts: list[str]
    reward_checkpoint: Path
    pad_id: int
    validation: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # the selector's, by subtask
    influence_checkpoints: list[Path] = field(default_factory=list)


def sample_and_score_inputs(cfg: SampleAndScoreConfig, out: Path) -> tuple[list[str], Path, int]:
    """Prompts, reward checkpoint and policy pad id of a job that samples and scores, checked before Ray starts.

    Every problem goes into one DataError: unreadable or empty prompts (file, row, field),
    prompts that do not fit the policy's context, a checkpoint of another kind or K.
    """
    from transformers import AutoConfig

    from uprlhf.models import load_tokenizer, resolve
    from uprlhf.rl.rollout import check_prompt_lengths
    from uprlhf.rl.scoring import check_reward_checkpoint

    data_dir = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    prompts_path = Path(cfg.prompts) if cfg.prompts else data_dir / "rl_prompts.parquet"
    checkpoint = Path(cfg.reward_checkpoint) if cfg.reward_checkpoint else out / "checkpoints" / cfg.reward_kind / "final"
    problems = check_reward_checkpoint(checkpoint, cfg.reward_kind, cfg.reward_k)
    prompts: list[str] = []
    try:
        prompts = [row["prompt"] for row in load_prompts(prompts_path).rows]
    except (DataError, FileNotFoundError) as err:
        problems.append(str(err))
    tokenizer = load_tokenizer(cfg.policy.model)
    if prompts:
        path = resolve(cfg.policy.model.name_or_path)
        limit = getattr(AutoConfig.from_pretrained(path, trust_remote_code=cfg.policy.model.trust_remote_code), "max_position_embeddings", None)
        problems += check_prompt_lengths(prompts, cfg.policy, cfg.rollout, tokenizer, limit, str(prompts_path))
    if problems:
        raise DataError(problems)
    return prompts, checkpoint, tokenizer.pad_token_id


def check_inputs(cfg: RLConfig, out: Path) -> Inputs:
    """The shared checks, plus enough prompts left for training once the evaluation ones are held out."""
    prompts, checkpoint, pad_id = sample_and_score_inputs(cfg, out)
    if len(prompts) <= cfg.eval_prompts:
        raise DataError([f"{len(prompts)} prompts leave none for training after eval_prompts={cfg.eval_prompts}"])
    inputs = Inputs(prompts[: -cfg.eval_prompts], prompts[-cfg.eval_prompts :], checkpoint, pad_id)
    if cfg.selector.enabled:
        inputs.validation, inputs.influence_checkpoints = selector_inputs(cfg, out, checkpoint)
    return inputs


def selector_inputs(cfg: SampleAndScoreConfig, out: Path, checkpoint: Path) -> tuple[dict, list[Path]]:
    """The selector's validation set (held-out chosen responses by subtask) and influence checkpoints, checked."""
    from uprlhf.reward.ensembles import MANIFEST
    from uprlhf.reward.training import MOMENTS_FILE
    from uprlhf.selection.selector import influence_checkpoints, validation_sets

    sel = cfg.selector
    data_dir = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    path = Path(sel.validation) if sel.validation else data_dir / "reward_test.parquet"
    rows = load_preferences(path).rows
    checkpoints = influence_checkpoints(checkpoint)
    problems = [f"{c}: not a reward ensemble checkpoint (no {MANIFEST})" for c in checkpoints if not (c / MANIFEST).exists()]
    if problems:
        raise DataError(problems)
    if sel.strategy in ("ugda", "influence") and not all((c / MOMENTS_FILE).exists() for c in checkpoints):
        print(f"[ppo] WARNING: {checkpoint.parent} has checkpoints without Adam moments (trained with ZeRO > 0?); "
              "influence uses plain gradients for the candidates there", flush=True)
    return validation_sets(rows, sel.validation_per_subtask, sel.seed), checkpoints


def sampling_bundles(cfg: SampleAndScoreConfig) -> list[dict[str, float]]:
    """R rollout bundles then one scorer bundle: the plan of every job that samples and scores."""
    rollout = {"CPU": cfg.rollout.cpus_per_worker, "GPU": cfg.rollout.gpus_per_worker}
    scorer = {"CPU": cfg.scorer_cpus, "GPU": cfg.scorer_gpus}
    return [_nonzero(b) for b in [rollout] * cfg.rollout.num_workers + [scorer]]


def bundles(cfg: RLConfig) -> list[dict[str, float]]:
    """The placement plan: R rollout bundles, one scorer bundle, W learner bundles, the selector's (in that order)."""
    learner = {"CPU": cfg.learner.cpus_per_worker, "GPU": 1.0 if cfg.learner.use_gpu else 0.0}
    selector = [{"CPU": cfg.selector.cpus, "GPU": cfg.selector.gpus}] if cfg.selector.enabled else []
    return sampling_bundles(cfg) + [_nonzero(learner)] * cfg.learner.num_workers + [_nonzero(b) for b in selector]


def _nonzero(bundle: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in bundle.items() if v > 0}


def rollout_actor(cfg: SampleAndScoreConfig, pg, bundle: int, policy: PolicyConfig | None = None):
    """A RolloutWorker in its bundle of ``pg`` (``policy`` overrides the configured one)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.rollout_worker import RolloutWorker

    return RolloutWorker.options(
        num_cpus=cfg.rollout.cpus_per_worker,
        num_gpus=cfg.rollout.gpus_per_worker,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
    ).remote(policy or cfg.policy, cfg.rollout, cfg.rollout.torch_threads or math.ceil(cfg.rollout.cpus_per_worker))


def scorer_actor(cfg: SampleAndScoreConfig, pg, bundle: int, checkpoint: str, version: int):
    """A RewardScorer holding ensemble ``checkpoint`` (as ``version``) in its bundle of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.reward_scorer import RewardScorer

    return RewardScorer.options(
        num_cpus=cfg.scorer_cpus,
        num_gpus=cfg.scorer_gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
    ).remote(
        checkpoint, version, cfg.policy, cfg.reward_max_length, cfg.rollout.temperature,
        cfg.scorer_threads or math.ceil(cfg.scorer_cpus), "cuda" if cfg.scorer_gpus > 0 else "cpu",
    )


def selector_actor(cfg: RLConfig, pg, bundle: int, out: Path, inputs: Inputs):
    """A SelectorActor in its bundle of ``pg``, writing refined versions under ``out``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.selector import SelectorActor

    return SelectorActor.options(
        num_cpus=cfg.selector.cpus,
        num_gpus=cfg.selector.gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
    ).remote(
        cfg.selector, str(out), [str(c) for c in inputs.influence_checkpoints], inputs.validation,
        cfg.reward_max_length, "cuda" if cfg.selector.gpus > 0 else "cpu",
    )


def reserve(plan: list[dict[str, float]], name: str):
    """A placement group for the plan, or one clear error when the cluster cannot hold it.

    Inside a placement group already (a Tune trial of ``tune.sweep``, whose group was
    built from this plan) that group is the run's: its bundle i is the plan's bundle i.
    """
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group

    current = get_current_placement_group()
    if current is not None:
        held = current.bundle_specs
        if len(held) != len(plan) or any(b.get(r, 0) > h.get(r, 0) + 1e-9 for b, h in zip(plan, held) for r in b):
            fail(f"running inside placement group {held}, which does not hold the placement plan {plan} bundle for bundle")
        return current
    have = ray.cluster_resources()
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0) for b in plan)
        if need > have.get(resource, 0) + 1e-9:
            fail(f"the placement plan needs {need:g} {resource} but the cluster has {have.get(resource, 0):g}; "
                 "lower rollout/learner cpus_per_worker, scorer_cpus or the worker counts")
    pg = placement_group(plan, strategy="PACK", name=f"{name}-{time.time_ns()}")
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        fail(f"could not place {plan} within {PLACEMENT_TIMEOUT_S} s (resources held by other jobs?)")
    return pg


def prompt_batch(prompts: list[str], step: int, batch_size: int, seed: int) -> list[str]:
    """The step's prompts: a fresh seeded permutation per epoch, so the data position is the step itself."""
    out: list[str] = []
    orders: dict[int, list[int]] = {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, len(prompts))
        if epoch not in orders:
            orders[epoch] = list(range(len(prompts)))
            random.Random(seed * 7919 + epoch).shuffle(orders[epoch])
        out.append(prompts[orders[epoch][index]])
    return out


@dataclass
class RunState:
    """What a checkpoint holds besides the learner's engine state."""

    step: int = -1  # last completed step
    policy_version: int = 0
    ensemble_version: int = 0
    ensemble_checkpoint: str = ""
    running_uncertainty: dict = field(default_factory=dict)
    kl_controller: dict = field(default_factory=dict)
    alarm: dict = field(default_factory=dict)
    selected_through: int = -1  # last step whose replay rows a published selection round has seen


class Gauges:
    """Per-step figures as ``ray.util.metrics`` gauges (and the alarm as a counter) for the Ray dashboard."""

    NAMES = (
        "reward_mean", "gold", "kl", "uncertainty", "running_uncertainty", "penalized_reward", "tokens_per_second",
        *(f"seconds_{s}" for s in STAGES),
    )

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run}
        self.gauges = {n: Gauge(f"uprlhf_{n}", description=f"uprlhf PPO {n}", tag_keys=("run",)) for n in self.NAMES}
        self.alarms = Counter("uprlhf_hacking_alarms", description="reward-hacking alarms fired", tag_keys=("run",))

    def record(self, record: dict) -> None:
        for name, gauge in self.gauges.items():
            if record.get(name) is not None:
                gauge.set(float(record[name]), tags=self.tags)
        if record.get("alarm"):
            self.alarms.inc(1.0, tags=self.tags)


class Role:
    """Handles of one kind of actor; a dead one is rebuilt (and brought up to date) and the call retried."""

    def __init__(self, name: str, make: Callable[[int], object], count: int, max_retries: int):
        self.name, self.make, self.max_retries = name, make, max_retries
        self.handles = [make(i) for i in range(count)]
        self.on_restart: Callable[[object], None] = lambda handle: None

    def call(self, method: str, args: list[tuple]) -> list:
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(self.max_retries + 1):
            refs = [getattr(h, method).remote(*a) for h, a in zip(self.handles, args)]
            try:
                return ray.get(refs)
            except RayActorError as err:
                if attempt == self.max_retries:
                    raise
                print(f"[ppo] {self.name} died ({type(err).__name__}); restarting and retrying {method}", flush=True)
                self._replace_dead()
        raise AssertionError("unreachable")

    def _replace_dead(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        for i, handle in enumerate(self.handles):
            try:
                ray.get(handle.version.remote(), timeout=60)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(handle)
                self.handles[i] = self.make(i)
                self.on_restart(self.handles[i])


def split(items: list, parts: int) -> list[list]:
    size = -(-len(items) // parts)
    return [items[i * size : (i + 1) * size] for i in range(parts) if items[i * size : (i + 1) * size]]


def run(
    cfg: RLConfig,
    out: Path,
    *,
    name: str | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """One PPO run in ``out`` (resuming if it holds a checkpoint); returns the run's summary.

    ``on_step(step, actors)`` is called before each step with the live actor handles
    (``rollout``, ``scorer``, ``learner``): a hook for fault-injection tests.
    ``on_record(record)`` gets each step's metrics once they are written (Tune reports them).
    """
    import ray
    from ray.util.placement_group import remove_placement_group

    from actors.learner_group import LearnerGroup
    from actors.replay_buffer import ReplayBufferActor
    from uprlhf.report import summarize

    try:
        inputs = check_inputs(cfg, out)
    except DataError as err:
        fail(str(err))
    name = name or cfg.penalty.name
    atomic_write_text(out / "config.yaml", to_yaml(cfg))  # every run folder says what ran (jobs.refine reads it)
    start_ray()

    # --- placement plan --------------------------------------------------------
    pg = reserve(bundles(cfg), f"uprlhf-ppo-{name}")
    r = cfg.rollout.num_workers

    rollout = Role("rollout worker", lambda i: rollout_actor(cfg, pg, i), r, cfg.max_retries)
    state = RunState(ensemble_checkpoint=str(inputs.reward_checkpoint))
    scorer = Role(
        "reward scorer",
        lambda i: scorer_actor(cfg, pg, r, state.ensemble_checkpoint, state.ensemble_version),
        1,
        cfg.max_retries,
    )
    learner = LearnerGroup(cfg, pg, first_bundle=r + 1)
    selector_bundle = r + 1 + cfg.learner.num_workers
    selector = selector_actor(cfg, pg, selector_bundle, out, inputs) if cfg.selector.enabled else None
    replay = ReplayBufferActor.remote(str(out / "replay"))
    gold_scorer = get_gold_scorer(cfg.gold)
    gauges = Gauges(name)
    metrics = MetricsLog(out)

    # --- resume ------------------------------------------------------------------
    ubar, alarm = RunningMean(), HackingAlarm(cfg.alarm)
    controller = AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    latest = read_json(out / "checkpoints" / "latest.json")
    if latest:
        state = RunState(**read_json(out / "checkpoints" / latest["dir"] / "state.json"))
        learner.load(str(out / "checkpoints" / latest["dir"]))
        ubar.load_state_dict(state.running_uncertainty)
        controller.load_state_dict(state.kl_controller)
        alarm.load_state_dict(state.alarm)
        scorer.call("load_ensemble", [(state.ensemble_checkpoint, state.ensemble_version)])
        print(f"[ppo] {name}: resuming after step {state.step} from {latest['dir']}", flush=True)
    ray.get(replay.truncate.remote(state.step))
    keep_metrics_through(out / "metrics.jsonl", state.step)

    broadcast = cfg.broadcast_weights()
    layout = learner.weights_layout() if broadcast else None

    def open_sync_group() -> None:
        """Learner rank 0 and every rollout worker join a fresh group (also after a worker is replaced)."""
        address, port = ray.get(learner.workers[0].rendezvous.remote())
        backend = "nccl" if cfg.learner.use_gpu else "gloo"
        ray.get(
            [learner.workers[0].join_sync_group.remote(address, port, r + 1, backend)]
            + [h.join_sync_group.remote(address, port, i + 1, r + 1, backend) for i, h in enumerate(rollout.handles)]
        )

    def sync_weights() -> float:
        if broadcast:
            senders = learner.broadcast_weights()
            receivers = [h.receive_weights.remote(layout, state.policy_version) for h in rollout.handles]
            return max(seconds for _, seconds in ray.get(senders + receivers))
        weights, compute = learner.policy_weights()
        ref = ray.put(weights)
        results = rollout.call("load_weights", [(ref, state.policy_version)] * r)
        return compute + max(seconds for _, seconds in results)

    def restart_rollout(handle) -> None:
        if broadcast:
            open_sync_group()
            sync_weights()
        else:
            ray.get(handle.load_weights.remote(learner.policy_weights()[0], state.policy_version))

    if broadcast:
        open_sync_group()
    rollout.on_restart = restart_rollout
    scorer.on_restart = lambda handle: ray.get(handle.load_ensemble.remote(state.ensemble_checkpoint, state.ensemble_version))
    if state.policy_version:
        sync_weights()

    def generate(prompts: list[str], seed: int) -> tuple[SampledBatch, float]:
        parts = split(prompts, r)
        results = rollout.call("generate", [(p, seed * 1000 + i) for i, p in enumerate(parts)])
        return SampledBatch.concat([b for b, _ in results], inputs.pad_id), max(s for _, s in results)

    def score(batch: SampledBatch) -> tuple[dict, float]:
        ((scores, seconds),) = scorer.call("score", [(batch,)])
        return scores, seconds

    def evaluate() -> tuple[dict, float]:
        batch, compute = generate(inputs.eval_prompts, EVAL_SEED + cfg.seed)
        scores, seconds = score(batch)
        mean, std = ensemble_stats(scores["member_rewards"])
        gold = gold_scorer.score(batch.prompts, batch.responses)
        return {
            "gold": sum(gold) / len(gold),
            "gold_kl": float(((batch.logprobs - scores["ref_logprobs"]) * batch.response_mask).sum(1).mean()),
            "proxy_eval": float(mean.mean()),
            "uncertainty_eval": float(std.mean()),
        }, compute + seconds

    selection: ray.ObjectRef | None = None  # a round in flight on the selector

    def publish_selection(record: dict) -> None:
        """If the selector finished a round, hot-swap its ensemble into the scorer; never waits for one.

        A failed round is logged and dropped (its rows go to the next one); a dead selector is replaced.
        """
        nonlocal selection, selector
        if selection is None or not ray.wait([selection], timeout=0)[0]:
            return
        try:
            result, seconds = ray.get(selection)
        except ray.exceptions.RayError as err:
            print(f"[ppo] {name}: WARNING selection round failed ({type(err).__name__}: {err}); the next round retries its rows", flush=True)
            if isinstance(err, ray.exceptions.RayActorError):
                selector = selector_actor(cfg, pg, selector_bundle, out, inputs)
            return
        finally:
            selection = None
        if result is None:
            return
        state.selected_through = result.through_step
        if not result.labelled:
            print(f"[ppo] {name}: selection round labelled nothing ({result.labeler_stats}); ensemble unchanged", flush=True)
            return
        scorer.call("load_ensemble", [(result.checkpoint, result.version)])
        state.ensemble_checkpoint, state.ensemble_version = result.checkpoint, result.version
        record.update(selection_seconds=seconds, selection_labelled=result.labelled, selection_candidates=result.candidates)
        print(f"[ppo] {name}: ensemble v{result.version} published ({result.strategy}: {result.labelled} of "
              f"{result.candidates} samples relabelled, {seconds:.0f} s)", flush=True)

    def start_selection(step: int) -> None:
        nonlocal selection
        if selector is None or selection is not None or (step + 1) % cfg.selector.every or step == cfg.ppo.steps - 1:
            return  # a round started on the last step could never be used
        selection = selector.run.remote(replay.rows_after.remote(state.selected_through), state.ensemble_checkpoint, state.ensemble_version)

    # --- the loop ------------------------------------------------------------------
    bar = tqdm(total=cfg.ppo.steps, initial=state.step + 1, desc=f"[ppo] {name}", unit="step", dynamic_ncols=True)
    for step in range(state.step + 1, cfg.ppo.steps):
        if on_step:
            on_step(step, {"rollout": rollout.handles, "scorer": scorer.handles, "learner": learner.workers, "selection": selection})
        wall, compute = {}, {}

        def stage(key: str, fn: Callable[[], tuple]):
            started = time.perf_counter()
            result, seconds = fn()
            wall[key], compute[key] = time.perf_counter() - started, seconds
            return result

        step_started = time.perf_counter()
        record: dict = {"step": step}
        publish_selection(record)
        if step % cfg.gold_every == 0:
            record.update(stage("evaluate", evaluate))
        prompts = prompt_batch(inputs.train_prompts, step, cfg.ppo.batch_size, cfg.seed)
        batch = stage("generate", lambda: generate(prompts, cfg.seed * 1_000_003 + step))
        scores = stage("score", lambda: score(batch))
        member = scores["member_rewards"]
        mean, std = ensemble_stats(member)
        ubar.update(std)
        log_ratio = ((batch.logprobs - scores["ref_logprobs"]) * batch.response_mask).sum(1)
        shaped = penalize_in_run(cfg.penalty.name, member, cfg.penalty.coefficients, running_mean=ubar.value, log_ratio=log_ratio)
        kl_coef = controller.coef
        stats = stage("train", lambda: learner.train(LearnerBatch(batch, scores["ref_logprobs"], shaped), step, kl_coef))
        if not cfg.kl_in_loss():
            controller.update(stats["kl"], len(batch))
        state.policy_version += 1
        stage("sync", lambda: (None, sync_weights()))
        gold = gold_scorer.score(batch.prompts, batch.responses)
        record.update(
            reward_mean=float(mean.mean()),
            uncertainty=float(std.mean()),
            running_uncertainty=ubar.value,
            penalized_reward=float(shaped.mean()),
            gold_train=sum(gold) / len(gold),
            kl_coef=kl_coef,
            response_length=float(batch.response_mask.sum(1).float().mean()),
            policy_version=state.policy_version,
            ensemble_version=state.ensemble_version,
            **stats,
        )
        record["alarm"] = alarm.update(step, record["uncertainty"], record["reward_mean"])
        if record["alarm"]:
            print(f"[ppo] {name}: WARNING reward-hacking alarm at step {step}: uncertainty {record['uncertainty']:.4f} "
                  f"left its band (threshold {alarm.threshold}) while the proxy reward climbs", flush=True)
        ray.get(replay.append.remote(step, replay_rows(batch, scores, mean, std, shaped, gold, step, state)))
        start_selection(step)
        step_seconds = time.perf_counter() - step_started
        record.update({f"seconds_{k}": v for k, v in wall.items()})
        record.update(
            step_seconds=step_seconds,
            ray_overhead_seconds=sum(wall[k] - compute[k] for k in wall),
            tokens_per_second=float(batch.response_mask.sum()) / wall["generate"],
        )
        metrics.write(record, "ppo", step)
        gauges.record(record)
        if on_record:
            on_record(record)
        state.step = step
        if step % cfg.checkpoint_every == cfg.checkpoint_every - 1 or step == cfg.ppo.steps - 1:
            state.running_uncertainty, state.kl_controller, state.alarm = ubar.state_dict(), controller.state_dict(), alarm.state_dict()
            save_checkpoint(out, learner, state)
        bar.set_postfix(proxy=f"{record['reward_mean']:.3f}", gold=f"{record['gold_train']:.3f}", kl=f"{record['kl']:.2f}")
        bar.update(1)
    bar.close()

    final_path = out / "final_eval.json"
    if not final_path.exists():
        final, _ = evaluate()
        write_json(final_path, {"step": cfg.ppo.steps, **final})
    metrics.close()
    records = read_records(out)
    summary = summarize({name: records})[name]
    summary.update(
        steps=cfg.ppo.steps,
        penalty=cfg.penalty.model_dump(),
        kl_in_loss=cfg.kl_in_loss(),
        replay_rows=ray.get(replay.num_rows.remote()),
        seconds_per_stage={k: mean_of(records, f"seconds_{k}") for k in STAGES},
        tokens_per_second=mean_of(records, "tokens_per_second"),
        ray_overhead_fraction=sum(r.get("ray_overhead_seconds", 0) for r in records) / max(1e-9, sum(r.get("step_seconds", 0) for r in records)),
    )
    write_json(out / "summary.json", summary)
    learner.shutdown()
    for handle in rollout.handles + scorer.handles + [replay] + ([selector] if selector else []):
        ray.kill(handle)
    if pg != ray.util.get_current_placement_group():  # a Tune trial's group is Tune's to remove
        remove_placement_group(pg)
    return summary


def replay_rows(batch: SampledBatch, scores: dict, mean, std, shaped, gold: list[float], step: int, state: RunState) -> dict:
    lengths = batch.response_mask.sum(1).tolist()
    prompt_lengths = batch.prompt_mask.sum(1).tolist()
    p = batch.prompt_ids.shape[1]
    return {
        "step": [step] * len(batch),
        "sample": list(range(len(batch))),
        "prompt": batch.prompts,
        "response": batch.responses,
        "prompt_ids": [batch.prompt_ids[i, p - n :].tolist() for i, n in enumerate(prompt_lengths)],
        "response_ids": [batch.response_ids[i, :n].tolist() for i, n in enumerate(lengths)],
        "logprobs": [batch.logprobs[i, :n].tolist() for i, n in enumerate(lengths)],
        "ref_logprobs": [scores["ref_logprobs"][i, :n].tolist() for i, n in enumerate(lengths)],
        "member_rewards": scores["member_rewards"].tolist(),
        "reward_mean": mean.tolist(),
        "reward_std": std.tolist(),
        "penalized_reward": shaped.tolist(),
        "gold": gold,
        "policy_version": [state.policy_version - 1] * len(batch),
        "ensemble_version": [state.ensemble_version] * len(batch),
    }


def save_checkpoint(out: Path, learner, state: RunState) -> None:
    """Write into a hidden folder, rename it into place, then point ``latest.json`` at it."""
    root = out / "checkpoints"
    final = root / f"step_{state.step:06d}"
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    learner.save(str(partial))
    write_json(partial / "state.json", state.__dict__)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    write_json(root / "latest.json", {"dir": final.name, "step": state.step})
    for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint a resumed run restarts from (they are redone)."""
    if not path.exists():
        return
    import json

    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_records(out: Path) -> list[dict]:
    """The run's step records plus the final evaluation (as a record at step = steps)."""
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = read_json(out / "final_eval.json")
    if final and records:
        last = records[-1]
        records.append({**{k: last[k] for k in ("kl", "reward_mean", "uncertainty", "penalized_reward")}, **final})
    return records


def mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(RLConfig, __doc__, argv)
    summary = run(cfg, out)
    print(f"[ppo] done: gold {summary['gold_final']}, KL {summary['kl_final']:.3f}; {out / 'summary.json'}", flush=True)


if __name__ == "__main__":
    main()
