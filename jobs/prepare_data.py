"""Step 1: build the embedded sentiment task (DESIGN §5) as Parquet files.

    python -m jobs.prepare_data --config jobs/configs/prepare_data.yaml --output-dir DIR

Review openings → 20/40/40 split of prompts (SFT / reward / RL) → the policy's own
completions for the reward prompts → gold scores → every pair of completions of a
prompt (except pairs with an empty or identical response, counted in the manifest) labelled by a Bradley–Terry draw with label noise → held-out pairs by
prompt → out-of-distribution responses. Writes DIR/data/ once per config: a second
run with the same config finds ``manifest.json`` and does nothing.
"""

from __future__ import annotations

from jobs.common import exit_on_error, parse, read_json, write_config, write_json
from jobs.drivers.prepare_data import build
from uprlhf.config import PrepareDataConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(PrepareDataConfig, __doc__, argv)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    with exit_on_error():
        manifest = build(cfg, out / "data")
    write_json(out / "summary.json", {**read_json(out / "summary.json"), "data": manifest})


if __name__ == "__main__":
    main()
