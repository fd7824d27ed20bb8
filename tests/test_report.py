import json

import pytest

from uprlhf.report import plot_overoptimisation, plot_training_curves, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(kls, gold=None, alarms=(), step_every=5, proxy_slope=0.1):
    """Records at steps 0, step_every, ...; ``gold`` maps step -> gold or (gold, gold_kl)."""
    records = []
    for i, kl in enumerate(kls):
        step = i * step_every
        record = {
            "step": step,
            "kl": kl,
            "reward_mean": proxy_slope * i,
            "uncertainty": 0.1 * (i + 1),
            "penalized_reward": proxy_slope * i - 0.05,
            "alarm": step in alarms,
        }
        if gold and step in gold:
            value = gold[step]
            if isinstance(value, tuple):
                record["gold"], record["gold_kl"] = value
            else:
                record["gold"] = value
        else:
            record["gold"] = None
        records.append(record)
    return records


@pytest.fixture
def runs():
    return {
        # gold_kl given and differing from kl; largest gold KL 3.0
        "mean": make_run(
            [0.0, 0.6, 1.2, 1.9, 2.5, 3.1, 3.4],
            gold={0: (0.0, 0.0), 10: (0.4, 1.0), 20: (0.6, 2.0), 30: (0.2, 3.0)},
            alarms={15, 20},
        ),
        # no gold_kl: uses kl; largest gold KL 1.5 -> the matched KL
        "up_rlhf": make_run([0.0, 0.2, 0.5, 1.0, 1.5], gold={0: 0.0, 10: 0.3, 20: 0.7}),
        # KL goes 0 -> 2 -> 1 -> 2.5 at the gold evaluations: 1.5 is crossed twice
        "lcb": make_run(
            [0.0, 1.0, 2.0, 1.5, 1.0, 2.0, 2.5],
            gold={0: 0.0, 10: 1.0, 20: 0.0, 30: 0.5},
        ),
    }


def test_summarize_values(runs):
    summary = summarize(runs)
    assert set(summary) == {"mean", "up_rlhf", "lcb"}
    assert all(row["matched_kl"] == 1.5 for row in summary.values())

    mean = summary["mean"]
    # between (KL 1.0, gold 0.4) and (KL 2.0, gold 0.6): 0.4 + 0.2 * 0.5
    assert mean["gold_at_matched_kl"] == pytest.approx(0.5)
    assert mean["gold_final"] == 0.2
    assert mean["gold_best"] == 0.6
    assert mean["gold_peak_step"] == 20
    assert mean["kl_final"] == 3.4
    assert mean["proxy_final"] == pytest.approx(0.6)
    assert mean["uncertainty_mean"] == pytest.approx(0.4)  # mean of 0.1..0.7
    assert mean["alarm_first_step"] == 15
    assert mean["alarm_lead_steps"] == 5

    up = summary["up_rlhf"]
    assert up["gold_at_matched_kl"] == pytest.approx(0.7)  # its own last point, exactly at 1.5
    assert up["alarm_first_step"] is None
    assert up["alarm_lead_steps"] is None

    # first crossing, on the segment KL 0 -> 2.0 (gold 0 -> 1): 0.75, not the later 2.0 -> 1.0 one
    assert summary["lcb"]["gold_at_matched_kl"] == pytest.approx(0.75)
    json.dumps(summary)  # goes into summary.json as it is


def test_summarize_single_run_matches_at_its_own_largest_kl(runs):
    summary = summarize({"mean": runs["mean"]})
    assert summary["mean"]["matched_kl"] == 3.0
    assert summary["mean"]["gold_at_matched_kl"] == pytest.approx(0.2)


def test_summarize_run_without_gold(runs):
    runs["lcb"] = make_run([0.0, 0.5, 0.9])
    summary = summarize(runs)
    row = summary["lcb"]
    for key in ("gold_final", "gold_best", "gold_peak_step", "gold_at_matched_kl"):
        assert row[key] is None
    assert row["matched_kl"] == 1.5  # set by the runs that have gold
    assert row["kl_final"] == 0.9

    no_gold = summarize({"lcb": runs["lcb"]})["lcb"]
    assert no_gold["matched_kl"] is None and no_gold["gold_at_matched_kl"] is None


def test_summarize_is_none_when_a_run_starts_past_the_matched_kl():
    runs = {
        "a": make_run([0.0, 0.5, 1.0], gold={0: 0.0, 10: 0.2}),
        "b": make_run([2.0, 3.0], gold={0: 0.5, 5: 0.4}),
    }
    summary = summarize(runs)
    assert summary["a"]["matched_kl"] == 1.0
    assert summary["b"]["gold_at_matched_kl"] is None


def test_summarize_keeps_the_later_record_of_a_resumed_step(runs):
    records = runs["up_rlhf"] + [dict(runs["up_rlhf"][-1], kl=9.0)]
    assert summarize({"up_rlhf": records})["up_rlhf"]["kl_final"] == 9.0


def test_summarize_names_the_bad_record(runs):
    del runs["mean"][2]["uncertainty"]
    with pytest.raises(ValueError, match=r"run 'mean', record 2: missing key\(s\) \['uncertainty'\]"):
        summarize(runs)
    runs["mean"][2]["uncertainty"] = float("nan")
    with pytest.raises(ValueError, match="'uncertainty' must be a finite number"):
        summarize(runs)


@pytest.mark.parametrize("plot", [plot_overoptimisation, plot_training_curves])
def test_plots_are_png(runs, tmp_path, plot):
    path = plot(runs, tmp_path / "figure.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # no temp file left behind


def test_plots_without_any_gold(tmp_path):
    runs = {"mean": make_run([0.0, 0.1, 0.2])}
    assert plot_overoptimisation(runs, tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)
    assert plot_training_curves(runs, tmp_path / "b.png").read_bytes().startswith(PNG_MAGIC)


def test_write_report(runs, tmp_path):
    summary = summarize(runs)
    extra = {"Sweep <best>": "| lr | gold |\n|---|--:|\n| 1e-5 | 0.42 |\n| a \\| b | <b>x</b> |"}
    out = tmp_path / "report"
    path = write_report(out, runs, summary, title="Run <script>", extra_markdown_tables=extra)

    assert path == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == [
        "overoptimisation.png",
        "report.html",
        "training_curves.png",
    ]
    for png in ("overoptimisation.png", "training_curves.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    page = path.read_text(encoding="utf-8")
    assert 'src="overoptimisation.png"' in page and 'src="training_curves.png"' in page
    for name in runs:
        assert f"<td>{name}</td>" in page
    assert "<td>0.75</td>" in page  # lcb gold at matched KL
    assert "<td>1.5</td>" in page  # matched KL
    assert "<td>15</td>" in page  # mean's first alarm step
    assert "Run &lt;script&gt;" in page and "<script>" not in page
    assert "<h2>Sweep &lt;best&gt;</h2>" in page
    assert "<td>0.42</td>" in page and "<td>a | b</td>" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page


def test_write_report_shows_non_table_markdown_verbatim(runs, tmp_path):
    page = write_report(
        tmp_path, runs, summarize(runs), title="t", extra_markdown_tables={"notes": "a & b"}
    ).read_text(encoding="utf-8")
    assert "<pre>a &amp; b</pre>" in page
