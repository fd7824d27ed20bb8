"""A PPO run against a reward ensemble: placement plan → role groups → resume → one ``trainer.step`` per step.

Roles (``actors.placement.rl_plan``): R rollout workers, the reward scorer (ensemble +
reference policy), W DeepSpeed learner ranks, the selector when refining, and a
zero-CPU replay buffer. A step is a short sequence of named stages
(``PPOTrainer.step``): publish a refined ensemble if the selector finished one →
gold evaluation every ``gold_every`` steps → generate → score → shape (penalty) →
PPO update → sync weights → replay rows, metrics, gauges, alarm → hand new replay
rows to the selector every ``selector.every`` steps (it works beside the loop and
blocks a step only when ``selector.wait_steps`` makes the round due) → checkpoint.
With ``async_steps=1`` the update runs beside the next step's generation, whose batch
the next step then scores and trains on (and a checkpoint keeps).
Started again on the same folder, the run resumes from its last checkpoint; a
rollout worker, the scorer or the replay buffer that dies or hangs is rebuilt by its
group and the call retried; a dead or hung selector is replaced and its round redone
(``wait_steps``) or counted as lost.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import yaml
from ray.util.placement_group import PlacementGroup
from tqdm import tqdm

from actors import RoleError
from actors.group import Deadline, Pending, RoleGroup
from actors.learner import LearnerWorker
from actors.placement import Placement, rl_plan, threads_for
from actors.replay_buffer import replay_group
from actors.reward_scorer import RewardScorer
from actors.rollout_worker import RolloutWorker
from actors.selector import SelectorActor
from jobs.common import Gauges, MetricsLog, keep_metrics_through, mean_of, read_json, read_records, start_ray, write_config, write_json
from jobs.drivers.inputs import RLInputs, rl_inputs
from uprlhf.config import ConfigError, RLConfig, build
from uprlhf.checkpoint import load_state, newest_intact, save_state, seal_checkpoint
from uprlhf.data.gold import get_gold_scorer
from uprlhf.paths import RunPaths
from uprlhf.report import summarize
from uprlhf.rl.estimators import group_ids, repeat_prompts
from uprlhf.rl.extra_rewards import ExtraRewardError, add_extras, extra_metrics
from uprlhf.rl.gold_metrics import var_reward
from uprlhf.rl.learner import LearnerBatch
from uprlhf.rl.replay import DIAGNOSTIC_COLUMNS, replay_diagnostics
from uprlhf.rl.penalties import penalize_in_run
from uprlhf.rl.policy import SampledBatch
from uprlhf.rl.run_state import RunState
from uprlhf.rl.scoring import ScoredBatch
from uprlhf.seeds import derive_seed

log = logging.getLogger("uprlhf")

STAGES = ("generate", "score", "train", "sync", "evaluate")
PREFETCHED = "prefetched"  # async_steps=1: the next step's batch in a checkpoint (safetensors + JSON)
KEEP_CHECKPOINTS = 2


def run_ppo(
    cfg: RLConfig,
    out: Path,
    *,
    name: str | None = None,
    adopt: PlacementGroup | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """One PPO run in ``out`` (resuming if it holds a checkpoint); returns the run's summary.

    ``adopt``: a placement group reserved for this run's plan (a Tune trial's), used instead
    of reserving one. ``on_step(step, actors)`` is called before each step with the live
    actor handles (a hook for fault-injection tests); ``on_record(record)`` gets each
    step's metrics once they are written (Tune reports them). Raises DataError for bad
    inputs (before anything starts), PlacementError and RoleError.
    """
    inputs = rl_inputs(cfg, out)
    name = name or cfg.penalty.name
    paths = RunPaths(out)
    check_resume(paths, cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_config(paths.root, cfg)  # every run folder says what ran (jobs.refine reads it)
    start_ray()

    placement = rl_plan(cfg).reserve(f"uprlhf-ppo-{name}", adopt=adopt)
    try:
        for rebuild in range(cfg.max_retries + 1):
            trainer = PPOTrainer(cfg, paths, name, inputs, placement)
            try:
                trainer.resume()
                for step in tqdm(range(trainer.state.step + 1, cfg.ppo.steps), desc=f"[ppo] {name}", unit="step",
                                 initial=trainer.state.step + 1, total=cfg.ppo.steps, dynamic_ncols=True):
                    if on_step:
                        on_step(step, trainer.actors())
                    record = trainer.step(step)
                    if on_record:
                        on_record(record)
                return trainer.finish()
            except (RoleError, ray.exceptions.RayActorError) as err:
                # A role that its group cannot rebuild alone (a learner rank, whose peers share its process
                # group; a call that did not go through a group's retry): rebuild the whole run instead.
                if (isinstance(err, RoleError) and err.role != "learner") or rebuild == cfg.max_retries:
                    raise
                log.warning("%s: a learner rank was lost (%s); rebuilding every role from the last checkpoint and "
                            "redoing the steps since", name, err)
            finally:
                trainer.shutdown()
        raise AssertionError("unreachable")
    finally:
        placement.release()


SAFE_RESUME_CHANGES = ("ppo.steps", "max_retries", "checkpoint_every")  # change no step's results


def check_resume(paths: RunPaths, cfg: RLConfig) -> None:
    """Refuse to resume a checkpointed run with a config that would change its results (ConfigError).

    The run folder's ``config.yaml`` is the config the run started with; a key other than
    ``SAFE_RESUME_CHANGES`` that differs is listed with both values. More steps are safe:
    the run trains on and its final evaluation is made again at the new last step.
    """
    if not paths.latest.exists() or not paths.config.exists():
        return
    saved = yaml.safe_load(paths.config.read_text())
    # Fields added since the run started take their defaults, which changes nothing; a saved
    # config the current schema rejects is compared as written, so every difference is listed.
    with contextlib.suppress(ConfigError):
        saved = build(RLConfig, saved, str(paths.config)).model_dump(mode="json")
    before, now = flatten(saved), flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in SAFE_RESUME_CHANGES)
    if changed:
        listed = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            f"{paths.root} holds a run of another config ({listed}); resume it with its own config.yaml, "
            "use a new --output-dir, or pass --force-new-config to move the old run aside"
        )
    final = read_json(paths.final_eval)
    if final and final.get("step") != cfg.ppo.steps:
        paths.final_eval.unlink()  # the run goes on to another last step: evaluate it there


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested config values as ``{"a.b.c": value}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prompt_batch(prompts: list[str], step: int, batch_size: int, seed: int) -> list[str]:
    """The step's prompts: a fresh seeded permutation per epoch, so the data position is the step itself."""
    out: list[str] = []
    orders: dict[int, list[int]] = {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, len(prompts))
        if epoch not in orders:
            orders[epoch] = list(range(len(prompts)))
            random.Random(derive_seed(seed, "prompt order", epoch)).shuffle(orders[epoch])
        out.append(prompts[orders[epoch][index]])
    return out


@dataclass
class Prefetched:
    """async_steps=1: the batch of ``step``, sampled by policy version ``policy_version`` while the step before trained."""

    step: int
    batch: SampledBatch
    policy_version: int

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Prefetched:
        return cls(state["step"], SampledBatch(**state["batch"]), state["policy_version"])


@dataclass
class RoundInFlight:
    """A selection round running beside the loop: its call, its arguments (to redo it), when it started, its due step."""

    pending: Pending
    args: tuple
    started: float
    due: int | None


class PPOTrainer:
    """The role groups of one run and the stages of its step; the run state it owns is what a checkpoint holds."""

    def __init__(self, cfg: RLConfig, paths: RunPaths, name: str, inputs: RLInputs, placement: Placement):
        self.cfg, self.paths, self.name, self.inputs = cfg, paths, name, inputs
        self.state = RunState.start(str(inputs.reward_checkpoint), cfg.kl, cfg.alarm)
        self.broadcast = cfg.broadcast_weights()
        self.rollout = placement.group(
            "rollout", RolloutWorker,
            (cfg.policy, cfg.rollout, threads_for(cfg.rollout.cpus_per_worker, cfg.rollout.torch_threads)),
            max_retries=cfg.max_retries, on_restart=self.update_rollout_worker, deadline=self.deadline(),
        )
        self.scorer = placement.group(
            "scorer", RewardScorer,
            (self.state.ensemble_checkpoint, self.state.ensemble_version, cfg.policy, cfg.reward_max_length,
             cfg.rollout.temperature, threads_for(cfg.scorer_cpus, cfg.scorer_threads), "cuda" if cfg.scorer_gpus > 0 else "cpu",
             cfg.extra_rewards, cfg.reward_normalise),
            max_retries=cfg.max_retries, on_restart=self.update_scorer, deadline=self.deadline(),
        )
        # Ranks share one process group, so one lost rank cannot be rebuilt alone: the group raises
        # RoleError and run_ppo rebuilds the whole run from its last checkpoint.
        self.learner = placement.group("learner", LearnerWorker, LearnerWorker.arguments(cfg), deadline=self.deadline())
        self.learner.setup(*self.learner.rendezvous())
        self.selector: RoleGroup | None = None
        if cfg.selector.enabled:
            self.selector = placement.group(
                "selector", SelectorActor,
                (cfg.selector, str(paths.root), [str(c) for c in inputs.influence_checkpoints], inputs.validation,
                 cfg.reward_max_length, "cuda" if cfg.selector.gpus > 0 else "cpu"),
                max_retries=cfg.max_retries, deadline=self.deadline(),
            )
        self.replay = replay_group(str(paths.replay), max_retries=cfg.max_retries, last_step=self.completed_step,
                                   deadline=self.deadline())
        self.selection: RoundInFlight | None = None
        self.gold = get_gold_scorer(cfg.gold)
        self.judges = [get_gold_scorer(name) for name in cfg.judges]
        self.gauges = Gauges(name, STAGES)
        self.metrics = MetricsLog(paths.root)
        self.layout = self.learner.weights_layout() if self.broadcast else None
        self.timings: dict[str, tuple[float, float]] = {}  # stage -> (wall, compute) seconds of this step
        self.prefetched: Prefetched | None = None  # async_steps=1: the next step's batch, sampled during this one

    def deadline(self) -> Deadline:
        """Each role's own deadlines, learnt from its calls so far."""
        cfg = self.cfg
        return Deadline(multiple=cfg.deadline_multiple, floor_s=cfg.deadline_floor_s, first_s=cfg.deadline_first_s)

    def completed_step(self) -> int:
        return self.state.step

    def actors(self) -> dict:
        """The live handles, for fault-injection hooks."""
        return {
            "rollout": self.rollout.handles, "scorer": self.scorer.handles, "learner": self.learner.handles,
            "replay": self.replay.handles, "selector": self.selector.handles if self.selector else [],
            "selection": self.selection.pending.refs[0] if self.selection else None,
        }

    # --- resume and weight sync ------------------------------------------------------
    def resume(self) -> None:
        """Load the last checkpoint if there is one; drop replay rows and metrics of the steps it redoes."""
        if self.broadcast:
            self.open_sync_group()
        folder = self.last_good_checkpoint()
        if folder is not None:
            self.state.restore(folder)
            self.learner.load(str(folder))
            if (folder / f"{PREFETCHED}.json").is_file():
                self.prefetched = Prefetched.from_state(load_state(folder / PREFETCHED))
            self.scorer.load_ensemble(self.state.ensemble_checkpoint, self.state.ensemble_version)
            log.info("%s: resuming after step %d from %s", self.name, self.state.step, folder.name)
        self.replay.truncate(self.state.step)
        keep_metrics_through(self.paths.metrics, self.state.step)
        if self.state.policy_version:
            self.sync_weights()

    def last_good_checkpoint(self) -> Path | None:
        """The newest kept checkpoint whose manifest verifies; a damaged one is reported in one line and skipped.

        ``latest.json`` names the newest complete checkpoint, but it is only a hint: the
        folders themselves are checked, newest first, so a deleted or damaged last
        checkpoint falls back to the one before it.
        """
        def damaged(folder: Path, problems: list[str]) -> None:
            log.warning("%s: checkpoint %s is damaged (%s); trying the one before it", self.name, folder, "; ".join(problems[:3]))

        return newest_intact(self.paths.checkpoints.glob("step_*"), damaged)

    def open_sync_group(self) -> None:
        """Learner rank 0 and every rollout worker join a fresh group (also after a worker is replaced)."""
        address, port = self.learner.rendezvous()
        backend = "nccl" if self.cfg.learner.use_gpu else "gloo"
        sender = self.learner.submit("join_sync_group", address, port, len(self.rollout) + 1, backend)
        receivers = self.rollout.submit("join_sync_group", address, port, backend)
        sender.result(), receivers.result()

    def sync_weights(self) -> float:
        """The learner's current weights to every rollout worker; returns the compute seconds."""
        if self.broadcast:
            sender = self.learner.submit("broadcast_weights")
            receivers = self.rollout.submit("receive_weights", self.layout, self.state.policy_version)
            return max(sender.result()[1], receivers.result()[1])
        weights, compute = self.learner.policy_weights()
        _, seconds = self.rollout.load_weights(ray.put(weights), self.state.policy_version)
        return compute + seconds

    def update_scorer(self, handle) -> None:
        """A rebuilt scorer takes the ensemble version the run is on."""
        ray.get(handle.load_ensemble.remote(self.state.ensemble_checkpoint, self.state.ensemble_version))

    def update_rollout_worker(self, handle) -> None:
        """Bring a rebuilt rollout worker to the current policy."""
        if self.broadcast:
            self.open_sync_group()
            self.sync_weights()
        else:
            ray.get(handle.load_weights.remote(self.learner.policy_weights()[0], self.state.policy_version))

    # --- the stages of a step --------------------------------------------------------
    def timed(self, stage: str, call: Callable[..., tuple], *args):
        """Run a stage that returns ``(result, compute seconds)``; keep its wall and compute time."""
        started = time.perf_counter()
        result, seconds = call(*args)
        wall, compute = self.timings.get(stage, (0.0, 0.0))  # a stage run twice in a step (async_steps=1's first) adds up
        self.timings[stage] = (wall + time.perf_counter() - started, compute + seconds)
        return result

    def sync(self) -> tuple[None, float]:
        return None, self.sync_weights()

    def generate(self, prompts: list[str], seed: int) -> tuple[SampledBatch, float]:
        return self.rollout.generate(prompts, seed)

    def score(self, batch: SampledBatch, step: int | None = None) -> tuple[ScoredBatch, float]:
        """The scores of ``batch``; with ``step``, the extra rules' values too (a failing rule is raised as it is)."""
        try:
            scores, seconds = self.scorer.score(batch, step)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, ExtraRewardError):
                raise err.cause from None  # its message names the rule, the step and the sample
            raise
        return ScoredBatch.of(batch, scores), seconds

    def evaluate(self, per_prompt: bool = False) -> tuple[dict, float]:
        """Gold, KL, proxy and uncertainty on the held-out prompts (the same sampling seed every time).

        ``per_prompt`` (the final evaluation) adds each prompt's gold, in prompt order, and
        its variance (Var_Reward, paper 003), so runs can be compared prompt by prompt.
        """
        batch, compute = self.generate(self.inputs.eval_prompts, derive_seed(self.cfg.seed, "evaluation"))
        scored, seconds = self.score(batch)
        gold = self.gold.score(batch.prompts, batch.responses)
        figures = {
            "gold": sum(gold) / len(gold),
            "gold_kl": float(scored.log_ratio.mean()),
            "proxy_eval": float(scored.mean.mean()),
            "uncertainty_eval": float(scored.std.mean()),
        }
        for judge in self.judges:
            verdicts = judge.score(batch.prompts, batch.responses)
            figures[f"judge_{judge.name}"] = sum(verdicts) / len(verdicts)
        if per_prompt:
            figures.update(gold_var=var_reward(gold), gold_per_prompt=list(gold))
        return figures, compute + seconds

    def shape(self, scored: ScoredBatch):
        """The penalised sequence rewards; ū takes this batch's uncertainties first."""
        self.state.running_uncertainty.update(scored.std)
        return penalize_in_run(
            self.cfg.penalty.name, scored.member_rewards, self.cfg.penalty.coefficients,
            running_mean=self.state.running_uncertainty.value, log_ratio=scored.log_ratio, member=self.cfg.penalty.member,
        )

    def train(self, scored: ScoredBatch, shaped, step: int, kl_coef: float) -> tuple[dict, float]:
        groups = group_ids(len(scored.sampled), self.cfg.ppo.samples_per_prompt)  # the step's prompts came n times in a row
        batch = LearnerBatch(scored.sampled, scored.ref_logprobs, shaped, groups)
        if self.cfg.async_steps and step + 1 < self.cfg.ppo.steps:
            stats, seconds = self.train_beside_next_generation(batch, step, kl_coef)
        else:
            stats, seconds = self.learner.train(batch, step, kl_coef)
        if self.cfg.kl_in_reward():
            self.state.kl_controller.update(stats["kl"], len(scored.sampled))
        self.state.policy_version += 1
        return stats, seconds

    def train_beside_next_generation(self, batch: LearnerBatch, step: int, kl_coef: float) -> tuple[dict, float]:
        """async_steps=1: the learner trains step t while the rollout workers, still on the weights before this
        update, sample step t+1. The stretch is the step's ``train`` stage; its compute is the longer of the two,
        so the time beyond it is what Ray and waiting cost."""
        started = time.perf_counter()
        pending = self.learner.submit("train", batch, step, kl_coef)
        self.prefetched = Prefetched(step + 1, self.timed("generate", self.generate, *self.sampling(step + 1)),
                                     self.state.policy_version)
        stats, seconds = self.learner.finish(pending, started, "train", batch, step, kl_coef)
        return stats, max(seconds, self.timings["generate"][0])

    def sampling(self, step: int) -> tuple[list[str], int]:
        """The prompts of ``step`` (each ppo.samples_per_prompt times in a row) and its sampling seed."""
        cfg = self.cfg
        n = cfg.ppo.samples_per_prompt
        return repeat_prompts(prompt_batch(self.inputs.train_prompts, step, cfg.ppo.batch_size // n, cfg.seed), n), \
            derive_seed(cfg.seed, "sampling", step)

    def step(self, step: int) -> dict:
        """One PPO step; returns its metrics record (also written to metrics.jsonl and the gauges)."""
        cfg, state = self.cfg, self.state
        self.timings = {}
        started = time.perf_counter()
        record: dict = {"step": step}
        self.publish_selection(record, step)
        if step % cfg.gold_every == 0:
            record.update(self.timed("evaluate", self.evaluate))
        if self.prefetched is not None and self.prefetched.step == step:  # sampled beside the last step's update
            batch, behaviour_version = self.prefetched.batch, self.prefetched.policy_version
        else:
            batch, behaviour_version = self.timed("generate", self.generate, *self.sampling(step)), state.policy_version
        self.prefetched = None
        scored = self.timed("score", self.score, batch, step)
        shaped = self.shape(scored)
        reward = add_extras(shaped, scored.extra_rewards, cfg.extra_rewards)
        kl_coef = state.kl_controller.coef
        stats = self.timed("train", self.train, scored, reward, step, kl_coef)
        self.timed("sync", self.sync)
        gold = self.gold.score(batch.prompts, batch.responses)
        record.update(
            reward_mean=float(scored.mean.mean()),
            uncertainty=float(scored.std.mean()),
            running_uncertainty=state.running_uncertainty.value,
            penalized_reward=float(shaped.mean()),
            gold_train=sum(gold) / len(gold),
            kl_coef=kl_coef,
            response_length=float(batch.response_mask.sum(1).float().mean()),
            policy_version=state.policy_version,
            ensemble_version=state.ensemble_version,
            **stats,
        )
        lag = state.policy_version - 1 - behaviour_version  # versions between the sampler's weights and the update's start
        if cfg.async_steps:
            record["policy_lag"] = lag
        if cfg.extra_rewards:  # the reward trained on, and each rule's unweighted batch mean
            record.update(reward_total=float(reward.mean()), **extra_metrics(scored.extra_rewards))
        self.watch_alarm(record, step)
        self.replay.append(step, replay_rows(scored, shaped, gold, step, behaviour_version, lag, state))
        self.start_selection(step)
        wall = {stage: w for stage, (w, _) in self.timings.items()}
        record.update({f"seconds_{k}": v for k, v in wall.items()})
        tokens, step_seconds = float(batch.response_mask.sum()), time.perf_counter() - started
        record.update(
            step_seconds=step_seconds,
            ray_overhead_seconds=sum(w - c for w, c in self.timings.values()),
            tokens_per_second=tokens / step_seconds,  # response tokens per second of the whole step, as everywhere
            # async_steps=1: the generation timed in a step is the next step's (none in the last one)
            generation_tokens_per_second=tokens / wall["generate"] if "generate" in wall else None,
        )
        self.metrics.write(record, "ppo", step)
        self.gauges.record(record)
        state.step = step
        if step % cfg.checkpoint_every == cfg.checkpoint_every - 1 or step == cfg.ppo.steps - 1:
            self.checkpoint()
        return record

    def watch_alarm(self, record: dict, step: int) -> None:
        record["alarm"] = self.state.alarm.update(step, record["uncertainty"], record["reward_mean"])
        if record["alarm"]:
            log.warning("%s: reward-hacking alarm at step %d: uncertainty %.4f left its band (threshold %s) while the proxy "
                        "reward climbs", self.name, step, record["uncertainty"], self.state.alarm.threshold)

    # --- the selector beside the loop ------------------------------------------------
    def publish_selection(self, record: dict, step: int) -> None:
        """If the selector finished a round, hot-swap its ensemble into the scorer.

        With ``selector.wait_steps`` the round is waited for at its due step, and one lost
        to a dead or hung selector is redone there, so the run is what it would have been
        without the fault. Otherwise a finished round is published whenever it is ready and
        one lost to a dead or hung selector is counted (``selection_failed`` in the record,
        the run state's ``failed_selections``), the selector replaced and the round's rows
        left to the next one. An error raised inside the selector ends the run.
        """
        flight = self.selection
        if flight is None:
            return
        if flight.due is not None:
            if step < flight.due:
                if flight.pending.ready() and flight.pending.died():  # redo it now, so that it is ready when due
                    log.warning("%s: the selector died during a selection round; replacing it and redoing the round", self.name)
                    self.selector.replace_dead()
                    flight.pending, flight.started = self.selector.submit("run", *flight.args), time.perf_counter()
                return
            result, seconds = self.selector.finish(flight.pending, flight.started, "run", *flight.args)
        elif flight.pending.ready():
            try:
                result, seconds = flight.pending.result()
            except ray.exceptions.RayActorError as err:
                self.lose_selection(record, step, f"{type(err).__name__}: {err}")
                return
        elif time.perf_counter() - flight.started > self.selector.deadline.seconds("run"):
            self.lose_selection(record, step, f"no answer within {self.selector.deadline.seconds('run'):.0f} s")
            return
        else:
            return
        self.selection = None
        if flight.due is None:
            self.selector.deadline.observe("run", time.perf_counter() - flight.started)
        if result is None:
            return
        self.state.selected_through = result.through_step
        if not result.labelled:
            log.info("%s: selection round labelled nothing (%s); ensemble unchanged", self.name, result.labeler_stats)
            return
        self.scorer.load_ensemble(result.checkpoint, result.version)
        self.state.ensemble_checkpoint, self.state.ensemble_version = result.checkpoint, result.version
        record.update(selection_seconds=seconds, selection_labelled=result.labelled, selection_candidates=result.candidates)
        log.info("%s: ensemble v%d published (%s: %d of %d samples relabelled, %.0f s)", self.name, result.version,
                 result.strategy, result.labelled, result.candidates, seconds)

    def lose_selection(self, record: dict, step: int, why: str) -> None:
        """Count a round lost to its selector, replace the selector and leave the round's rows to the next round."""
        self.selection = None
        self.state.failed_selections += 1
        self.state.failed_selection_steps.append(step)
        record["selection_failed"] = 1
        log.warning("%s: selection round lost (%s); the selector is replaced and the next round retries its rows", self.name, why)
        self.selector.replace()

    def start_selection(self, step: int) -> None:
        """Every ``selector.every`` steps, a round on the rows since the last one (none that could not be published in time)."""
        cfg = self.cfg
        if self.selector is None or self.selection is not None or (step + 1) % cfg.selector.every:
            return
        due = None if cfg.selector.wait_steps is None else step + cfg.selector.wait_steps
        if (due or step + 1) > cfg.ppo.steps - 1:
            return
        rows = self.replay.submit("rows_after", self.state.selected_through).refs[0]
        args = (rows, self.state.ensemble_checkpoint, self.state.ensemble_version)
        self.selection = RoundInFlight(self.selector.submit("run", *args), args, time.perf_counter(), due)

    # --- checkpoint and the end of the run -------------------------------------------
    def checkpoint(self) -> None:
        """Seal the learner and run state as the step's checkpoint, then point ``latest.json`` at it."""
        def fill(partial: Path) -> None:
            self.learner.save(str(partial))
            self.state.save(partial)
            if self.prefetched is not None:  # async_steps=1: the next step trains on it, so a resume must too
                save_state(partial / PREFETCHED, self.prefetched.state_dict())

        final = seal_checkpoint(self.paths.step_checkpoint(self.state.step), fill)
        write_json(self.paths.latest, {"dir": final.name, "step": self.state.step})
        for old in sorted(self.paths.checkpoints.glob("step_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def finish(self) -> dict:
        """The final gold evaluation (once) and the run's summary.json."""
        cfg = self.cfg
        if not self.paths.final_eval.exists():
            final, _ = self.evaluate(per_prompt=True)
            write_json(self.paths.final_eval, {"step": cfg.ppo.steps, **final})
        self.metrics.close()
        records = read_records(self.paths.root)
        summary = summarize({self.name: records})[self.name]
        final = read_json(self.paths.final_eval)
        summary.update(
            steps=cfg.ppo.steps,
            gold_var_final=final.get("gold_var"),
            gold_per_prompt_final=final.get("gold_per_prompt"),
            **{f"judge_{name}_final": final.get(f"judge_{name}") for name in cfg.judges},
            penalty=cfg.penalty.model_dump(),
            kl_in_loss=cfg.kl_in_loss(),
            replay_rows=self.replay.num_rows(),
            **replay_diagnostics(self.replay.columns(DIAGNOSTIC_COLUMNS)),
            failed_selections=self.state.failed_selections,
            seconds_per_stage={k: mean_of(records, f"seconds_{k}") for k in STAGES},
            tokens_per_second=mean_of(records, "tokens_per_second"),
            generation_tokens_per_second=mean_of(records, "generation_tokens_per_second"),
            ray_overhead_fraction=sum(r.get("ray_overhead_seconds", 0) for r in records)
            / max(1e-9, sum(r.get("step_seconds", 0) for r in records)),
        )
        write_json(self.paths.summary, summary)
        return summary

    def shutdown(self) -> None:
        self.metrics.close()
        self.gauges.close()
        for group in (self.rollout, self.scorer, self.learner, self.replay, self.selector):
            if group is not None:
                group.kill()


def replay_rows(scored: ScoredBatch, shaped, gold: list[float], step: int, behaviour_version: int, lag: int,
                state: RunState) -> dict:
    """One step's samples as replay-buffer columns (token ids and log-probs cut to their true lengths)."""
    batch = scored.sampled
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
        "ref_logprobs": [scored.ref_logprobs[i, :n].tolist() for i, n in enumerate(lengths)],
        "member_rewards": scored.member_rewards.tolist(),
        "reward_mean": scored.mean.tolist(),
        "reward_std": scored.std.tolist(),
        "penalized_reward": shaped.tolist(),
        "gold": gold,
        "policy_version": [behaviour_version] * len(batch),
        "policy_lag": [lag] * len(batch),
        "ensemble_version": [state.ensemble_version] * len(batch),
    }
