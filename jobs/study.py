"""A study: arms × seeds of one job (ppo, best_of_n, reward or bandit cells), aggregated over seeds with the claims decided.

    python -m jobs.study --config jobs/configs/studies/NAME.yaml [--output-dir DIR]

Writes DIR/study.md (per arm mean ± std and 95 % interval over seeds, differences to
the baseline arm paired by seed, one line per claim: holds / does not hold /
inconclusive), DIR/study.json and the job's plots (curves.png; uncertainty.png for ppo).
Started again on the same DIR, it resumes without redoing finished cells.
"""

from __future__ import annotations

from jobs.common import exit_on_error, parse
from jobs.drivers.study import run_study
from uprlhf.studies.config import StudyConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(StudyConfig, __doc__, argv)
    with exit_on_error():
        run_study(cfg, out)


if __name__ == "__main__":
    main()
