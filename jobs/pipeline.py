"""The main job: Steps 1-2 end to end on one output folder (the RL issue adds Step 3).

    python -m jobs.pipeline --config jobs/configs/demo.yaml --output-dir DIR

prepare data (DIR/data, cached per config) → train and evaluate the reward
ensembles of every configured kind (DIR/checkpoints, summary.json, the ensemble
table). Started again on the same DIR, it resumes where it stopped.
"""

from __future__ import annotations

import time

from jobs import prepare_data, train_reward
from jobs.common import parse, read_json, write_json
from uprlhf.config import PipelineConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(PipelineConfig, __doc__, argv)
    started = time.perf_counter()
    manifest = prepare_data.build(cfg.data, out / "data")
    summary = train_reward.run(cfg.reward.model_copy(update={"data_dir": str(out / "data")}), out)
    summary = {**read_json(out / "summary.json"), **summary, "data": manifest, "pipeline_seconds": time.perf_counter() - started}
    write_json(out / "summary.json", summary)
    print(f"[pipeline] done in {summary['pipeline_seconds']:.0f}s; table in {out / 'ensemble_table.md'}", flush=True)


if __name__ == "__main__":
    main()
