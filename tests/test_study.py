"""jobs.study: the aggregation over seeds on hand values, the config's checks, and the tiny study end to end."""

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from uprlhf.config import ConfigError, load_config
from uprlhf.rl.replay import read_replay, replay_diagnostics
from uprlhf.studies.aggregate import aggregate, cell_figures, decide, markdown, matched_kl, rank_correlation, spread
from uprlhf.studies.config import ClaimConfig, StudyConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "studies" / "tiny.yaml"
T_975_2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom


def test_spread_is_mean_sample_std_and_the_student_t_interval():
    figure = spread([1.0, 2.0, 3.0])
    assert figure["n"] == 3 and figure["mean"] == 2.0 and figure["std"] == pytest.approx(1.0)
    half = T_975_2 / math.sqrt(3)
    assert figure["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert spread([5.0, None]) == {"n": 1, "mean": 5.0, "std": None, "ci95": None}
    assert spread([]) == {"n": 0, "mean": None, "std": None, "ci95": None}


def test_differences_to_the_baseline_are_paired_by_seed_and_win_rates_are_taken_against_a_half():
    cells = {
        "base": {0: {"gold_final": 1.0, "win_rate": 0.5}, 1: {"gold_final": 3.0, "win_rate": 0.5}, 2: {"gold_final": 2.0, "win_rate": 0.5}},
        "arm": {0: {"gold_final": 2.0, "win_rate": 0.75}, 1: {"gold_final": 5.0, "win_rate": 1.0}, 2: {"gold_final": 5.0, "win_rate": 0.5}},
    }
    result = aggregate(cells, "base")
    assert result["arms"]["arm"]["metrics"]["gold_final"]["mean"] == pytest.approx(4.0)
    difference = result["arms"]["arm"]["versus_baseline"]["gold_final"]  # 1, 2, 3 paired by seed
    assert difference["mean"] == pytest.approx(2.0) and difference["std"] == pytest.approx(1.0)
    assert difference["ci95"][0] == pytest.approx(2.0 - T_975_2 / math.sqrt(3))
    assert result["arms"]["arm"]["versus_baseline"]["win_rate"]["mean"] == pytest.approx(0.25)  # (0.25, 0.5, 0) - ½
    assert result["arms"]["base"]["versus_baseline"] == {}
    claim = ClaimConfig(text="arm beats base", metric="gold_final", arm="arm")
    assert decide(claim, result)["verdict"] == "inconclusive"  # 2 ± 2.48 reaches below 0


@pytest.mark.parametrize(("direction", "verdict"), [("higher", "holds"), ("lower", "does not hold")])
def test_a_claim_is_decided_by_which_side_of_no_effect_its_interval_lies(direction, verdict):
    cells = {"base": {s: {"gold_final": 0.0} for s in range(3)}, "arm": {0: {"gold_final": 2.0}, 1: {"gold_final": 2.1}, 2: {"gold_final": 1.9}}}
    decided = decide(ClaimConfig(text="t", metric="gold_final", arm="arm", direction=direction), aggregate(cells, "base"))
    assert decided["verdict"] == verdict
    assert decided["difference"]["ci95"] == pytest.approx([2.0 - 0.1 * T_975_2 / math.sqrt(3), 2.0 + 0.1 * T_975_2 / math.sqrt(3)])


def test_a_cells_gold_is_read_at_the_kl_every_cell_reached_and_its_win_rate_against_its_seeds_baseline():
    curves = {"a": {0: [(0.0, 1.0), (2.0, 3.0)]}, "b": {0: [(0.0, 1.0), (1.0, 0.0)]}}
    assert matched_kl(curves) == 1.0
    summary = {"gold_final": 3.0, "gold_per_prompt_final": [1.0, 2.0, 3.0, 4.0]}
    figures = cell_figures(summary, curves["a"][0], 1.0, [0.0, 2.0, 5.0, 1.0])
    assert figures["gold_at_matched_kl"] == pytest.approx(2.0)  # halfway from (0, 1) to (2, 3)
    assert figures["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert figures["gold_final"] == 3.0


def test_a_ppo_study_reports_the_final_score_of_each_of_its_judges_and_no_other():
    cfg = load_config(StudyConfig, TINY, ["rl.judges=[textblob]"])
    assert cfg.metrics[-1] == "judge_textblob_final" and "judge_vader_final" not in cfg.metrics
    assert "judge_textblob_final" not in load_config(StudyConfig, TINY, []).metrics
    figures = cell_figures({"gold_final": 0.5, "judge_textblob_final": 0.25}, [(0.0, 0.5)], 0.0, None, (), cfg.metrics)
    assert figures["judge_textblob_final"] == 0.25 and figures["gold_final"] == 0.5
    with pytest.raises(ConfigError, match="judge_vader_final"):  # a claim on a judge the cells do not run
        load_config(StudyConfig, TINY, ["rl.judges=[textblob]",
                                        "claims=[{text: t, metric: judge_vader_final, arm: lcb}]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("baseline=nope", "baseline='nope' is not an arm; arms: 'mean', 'lcb'"),
        ("seeds=[1, 1]", "repeat a seed"),
        ("arms={mean: [], lcb: [penalty.name=lcb]}", "arms.lcb: 'penalty.name=lcb' must be rl.PATH=VALUE or reward.PATH=VALUE"),
        ("arms={mean: [], lcb: [reward.ensemble.k=3]}", "overrides the ensemble training, but reward is null"),
        ("claims=[{text: t, metric: gold_final, arm: mean}]", "must be an arm other than the one it is compared with"),
        ("claims=[{text: t, metric: nope, arm: lcb}]", "claims.0.metric = 'nope': not a figure of a ppo study"),
        ("claims=[{text: t, metric: accuracy, arm: lcb}]", "claims.0.metric = 'accuracy': not a figure of a ppo study"),
        ("claims=[{text: t, metric: gold_final, arm: lcb, against: nope}]", "compared with .'nope'."),
        ("job=best_of_n", "job best_of_n needs a best_of_n section"),
        ("job=reward", "claims.0.metric = 'gold_final': not a figure of a reward study"),
    ],
)
def test_a_bad_study_config_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(StudyConfig, TINY, [override])


def test_a_bad_arm_is_refused_before_anything_is_written(tmp_path, capsys):
    from jobs.study import main

    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(TINY), "--output-dir", str(out), "arms={mean: [], lcb: [rl.penalty.name=nope]}"])
    assert exit_info.value.code == 2
    assert "arms.lcb seed 0: penalty.name = 'nope': unknown penalty 'nope'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_the_tiny_study_aggregates_its_cells_and_resumes_without_redoing_them(local_ray, tmp_path, monkeypatch):
    """Two arms × two seeds through Ray Tune: study.json's figures are the cells' summaries, recomputed here."""
    from jobs.common import read_json
    from jobs.drivers.study import run_study

    monkeypatch.chdir(ROOT)
    cfg = load_config(StudyConfig, TINY)
    out = tmp_path / "study"
    study = run_study(cfg, out)
    summaries = {(arm, seed): read_json(out / "cells" / f"{arm}-seed{seed}" / "summary.json") for arm in cfg.arms for seed in cfg.seeds}
    for arm in cfg.arms:
        finals = [summaries[arm, seed]["gold_final"] for seed in cfg.seeds]
        figure = study["arms"][arm]["metrics"]["gold_final"]
        assert figure["mean"] == pytest.approx(sum(finals) / 2) and figure["std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
    for seed in cfg.seeds:
        lcb, mean = summaries["lcb", seed]["gold_per_prompt_final"], summaries["mean", seed]["gold_per_prompt_final"]
        wins = sum((a > b) + 0.5 * (a == b) for a, b in zip(lcb, mean)) / len(lcb)
        assert study["cells"]["lcb"][seed]["win_rate"] == pytest.approx(wins)
        assert summaries["lcb", seed]["penalty"]["name"] == "lcb" and summaries["mean", seed]["penalty"]["name"] == "mean"
    assert summaries["mean", 0]["gold_per_prompt_final"] != summaries["mean", 1]["gold_per_prompt_final"]  # the seed reaches the run
    difference = [summaries["lcb", s]["gold_final"] - summaries["mean", s]["gold_final"] for s in cfg.seeds]
    assert study["arms"]["lcb"]["versus_baseline"]["gold_final"]["mean"] == pytest.approx(sum(difference) / 2)
    assert [c["verdict"] for c in study["claims"]] == [decide(cfg.claims[0], study)["verdict"]]
    assert "## Claims" in (out / "study.md").read_text() and (out / "curves.png").stat().st_size > 0
    steps = [json.loads(line) for line in (out / "cells" / "lcb-seed1" / "metrics.jsonl").read_text().splitlines()]
    expected = stats.spearmanr([r["kl"] for r in steps], [r["uncertainty"] for r in steps]).statistic
    assert len(steps) == cfg.rl.ppo.steps and study["cells"]["lcb"][1]["u_kl_spearman"] == pytest.approx(expected)
    assert (out / "uncertainty.png").stat().st_size > 0
    replay = replay_diagnostics(read_replay(out / "cells" / "lcb-seed1" / "replay"))
    assert {k: study["cells"]["lcb"][1][k] for k in replay} == replay == {k: summaries["lcb", 1][k] for k in replay}
    assert replay["u_kl_spearman_samples"] is not None
    assert json.loads((out / "study.json").read_text())["baseline"] == "mean"

    written = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/metrics.jsonl")}
    run_study(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in written} == written


@pytest.mark.parametrize("config", sorted((ROOT / "jobs" / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_builds_a_valid_config_for_each_cell(config, tmp_path):
    from jobs.drivers.study import Cells

    cfg = load_config(StudyConfig, config, [])
    cells = Cells(cfg, tmp_path)
    cells.built()
    assert set(cells.configs) == {(arm, seed) for arm in cfg.arms for seed in cfg.seeds}
    seed_of = {"reward": lambda c: c.train.seed, "bandit": lambda c: None}.get(cfg.job, lambda c: c.seed)
    assert all(seed_of(c) in (seed, None) for (_, seed), c in cells.configs.items())
    if cfg.job == "reward":
        assert {arm: cells.kind(arm) for arm in cfg.arms} == {arm: cells.configs[arm, cfg.seeds[0]].kinds[0] for arm in cfg.arms}


def test_rank_correlation_of_u_with_kl_is_spearmans_and_none_without_enough_steps():
    assert rank_correlation([(0.0, 0.1), (1.0, 0.2), (2.0, 0.25), (3.0, 0.9)]) == pytest.approx(1.0)
    assert rank_correlation([(0.0, 0.3), (1.0, 0.1), (2.0, 0.2)]) == pytest.approx(-0.5)
    assert rank_correlation([(0.0, 0.1), (1.0, 0.2)]) is None and rank_correlation([(0.0, 0.1), (1.0, 0.1), (2.0, 0.1)]) is None


def test_a_spread_claim_is_decided_by_the_f_interval_of_the_variance_ratio():
    """std over seeds 0.1 against 1.0 on 5 seeds each: ratio 0.01, whose F(4, 4) interval lies below 1."""
    tight, wide = [1.0 + 0.1 * d for d in (-1.5, -0.5, 0.0, 0.5, 1.5)], [1.0 + d for d in (-1.5, -0.5, 0.0, 0.5, 1.5)]
    cells = {"mean": dict(enumerate({"gold_final": v} for v in wide)), "var_kl": dict(enumerate({"gold_final": v} for v in tight))}
    aggregated = aggregate(cells, "mean", ["gold_final"])
    claim = ClaimConfig(text="t", metric="gold_final", arm="var_kl", direction="lower", compare="spread")
    decided = decide(claim, aggregated)
    f_high, f_low = stats.f.ppf(0.975, 4, 4), stats.f.ppf(0.025, 4, 4)
    assert decided["ratio"]["value"] == pytest.approx(0.01) and decided["ratio"]["n"] == [5, 5]
    assert decided["ratio"]["ci95"] == pytest.approx([0.01 / f_high, 0.01 / f_low]) and decided["verdict"] == "holds"
    assert decide(claim.model_copy(update={"direction": "higher"}), aggregated)["verdict"] == "does not hold"
    same = aggregate({"mean": cells["mean"], "var_kl": cells["mean"]}, "mean", ["gold_final"])
    assert decide(claim, same)["ratio"]["value"] == pytest.approx(1.0) and decide(claim, same)["verdict"] == "inconclusive"
    assert "variance ratio 0.01" in markdown(aggregated, [decided], "cmd")


def test_seed_fields_set_each_cells_member_to_its_seed_and_only_under_the_cells_section(tmp_path):
    from jobs.drivers.study import Cells

    cfg = load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s5_variance_aware.yaml")
    cells = Cells(cfg, tmp_path)
    assert [cells.config("var_kl", seed).penalty.member for seed in cfg.seeds] == list(cfg.seeds)
    assert all(cells.config("var_kl", seed).seed == seed for seed in cfg.seeds)
    with pytest.raises(ConfigError, match=r"seed_fields: 'reward.train.seed' must be a dotted path under rl\."):
        load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s5_variance_aware.yaml", ["seed_fields=[reward.train.seed]"])
    with pytest.raises(ConfigError, match=r"arms.var_kl: rl.penalty.member is a seed field"):
        load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s5_variance_aware.yaml",
                    ["arms={mean: [], var_kl: [rl.penalty.member=1]}"])


def test_a_member_beyond_the_ensemble_is_refused_for_every_seed_before_anything_runs(tmp_path):
    from jobs.drivers.study import Cells, check_inputs

    cfg = load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s5_variance_aware.yaml", ["seeds=[3, 5, 6]"])
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg, Cells(cfg, tmp_path))
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["arms.mean seed 5", "arms.mean seed 6", "arms.var_kl seed 5", "arms.var_kl seed 6"]
    assert "penalty.member=5 is out of range: the reward checkpoint has K = 5" in lines[0]
    assert not (tmp_path / "cells").exists()


def test_a_claim_against_another_arm_is_paired_with_that_arm_by_seed():
    cells = {"base": {s: {"ece": 0.5} for s in range(3)}, "lora": {0: {"ece": 0.3}, 1: {"ece": 0.2}, 2: {"ece": 0.4}},
             "diverse": {0: {"ece": 0.2}, 1: {"ece": 0.1}, 2: {"ece": 0.3}}}
    claim = ClaimConfig(text="t", metric="ece", arm="diverse", against="lora", direction="lower")
    decided = decide(claim, aggregate(cells, "base", ["ece"]), cells)
    assert decided["against"] == "lora" and decided["difference"]["mean"] == pytest.approx(-0.1)
    assert decided["difference"]["std"] == pytest.approx(0.0, abs=1e-9) and decided["verdict"] == "holds"  # -0.1 on every seed
    with pytest.raises(ValueError, match="its cells are needed"):
        decide(claim, aggregate(cells, "base", ["ece"]))


def test_a_reward_cell_trains_one_kind_with_the_cells_seed_and_two_kinds_are_refused(tmp_path):
    from jobs.drivers.study import Cells

    cfg = load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s1_ensembles.yaml")
    cells = Cells(cfg, tmp_path)
    cell = cells.config("lora", 3)
    assert cell.kinds == ["lora"] and cell.train.seed == 3 and cell.data_dir == str(tmp_path / "data")
    cfg = load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s1_ensembles.yaml", ["arms={single: ['reward.kinds=[single, lora]'], lora: [], diverse_lora: []}"])
    with pytest.raises(ConfigError, match=r"arms.single: a reward study's cell trains one kind, got reward.kinds=\['single', 'lora'\]"):
        Cells(cfg, tmp_path).config("single", 0)


def test_a_pair_budget_past_the_data_stops_a_reward_study_before_its_first_cell(tmp_path):
    from jobs.drivers.study import Cells, build_shared
    from tests.conftest import toy_pairs
    from uprlhf.data.loaders import DataError, write_parquet

    data = tmp_path / "data"
    data.mkdir()
    write_parquet(toy_pairs(12), data / "reward_train.parquet")
    write_parquet(toy_pairs(4, seed=9), data / "reward_test.parquet")
    write_parquet([{"prompt": "the movie was", "response": "zz qq"}] * 2, data / "ood.parquet")
    cfg = load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s7_reward_data.yaml",
                      ["data=null", f"reward.data_dir={data}", "arms={small: ['reward.train.max_pairs=10'], large: ['reward.train.max_pairs=13']}",
                       "baseline=small", "claims=[]"])
    cells = Cells(cfg, tmp_path / "study")
    cells.built()
    with pytest.raises(DataError) as raised:
        build_shared(cfg, cells)
    assert str(raised.value) == f"{data / 'reward_train.parquet'}: 12 usable pairs, fewer than reward.train.max_pairs=13"
    assert not (tmp_path / "study" / "cells").exists()


def test_the_bandit_study_reports_each_cells_simulated_return_and_decides_its_claims(tmp_path):
    """Paper 002's simulation as a study (no Ray): every figure is simulate()'s for the cell's setting, policy and seed."""
    from jobs.drivers.study import run_study
    from uprlhf.studies.bandit import BanditConfig, simulate

    cfg = load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s5_bandit.yaml", ["bandit.draws=64", "bandit.arms=50", "seeds=[0, 1, 2]"])
    study = run_study(cfg, tmp_path / "bandit")
    base = BanditConfig(arms=50, draws=64)
    for arm, policy, variances in (("aware_high", "variance_aware", (3.0, 100.0)), ("vanilla_low", "vanilla", (70.0, 100.0))):
        stds = [simulate(base.replace(variance_range=variances), seed)[policy]["std"] for seed in (0, 1, 2)]
        assert [study["cells"][arm][s]["return_std"] for s in (0, 1, 2)] == pytest.approx(stds)
    low = [study["cells"]["aware_low"][s]["return_std"] - study["cells"]["vanilla_low"][s]["return_std"] for s in (0, 1, 2)]
    assert study["claims"][1]["against"] == "vanilla_low" and study["claims"][1]["difference"]["mean"] == pytest.approx(sum(low) / 3)
    assert "return_std of aware_low − vanilla_low" in (tmp_path / "bandit" / "study.md").read_text()


def test_best_of_n_figures_read_every_n_and_order_each_curve_by_n(tmp_path):
    """A best-of-n summary keys its rows by n as JSON text ("16" < "2"): the curve still runs 1, 2, 4, ..., 32."""
    from jobs.drivers.study import Cells, best_of_n_figures

    cfg = load_config(StudyConfig, ROOT / "jobs" / "configs" / "studies" / "s4_best_of_n.yaml", ["seeds=[0, 1]"])
    cells = Cells(cfg, tmp_path)
    cells.built()
    rows = {str(n): {"gold": n / 100, "proxy": n / 10, "uncertainty": 0.01 * n} for n in sorted(cfg.best_of_n.n, key=str)}
    summaries = {arm: {seed: {"best_of_n": {"mean": rows}} for seed in cfg.seeds} for arm in cfg.arms}
    figures, plots, _ = best_of_n_figures(cells, summaries)
    assert figures["lora"][1]["gold_n16"] == 0.16 and figures["single"][0]["uncertainty_n32"] == pytest.approx(0.32)
    assert [n for n, _ in plots["curves.png"].curves["diverse_lora"][0]] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert plots["curves.png"].log_x
