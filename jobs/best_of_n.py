"""Best-of-n sampling ranked by uncertainty penalties: gold against KL without any training.

    python -m jobs.best_of_n --config jobs/configs/best_of_n.yaml --output-dir DIR "n=[1,4,16]"

Placement: R rollout workers and one reward scorer in one placement group. The
loop: max(n) samples per held-out prompt → member rewards (ensemble) and gold →
for each penalty and n, the best of the first n samples per prompt →
DIR/summary.json (``best_of_n.<penalty>.<n>``) and DIR/best_of_n.png.
"""

from __future__ import annotations

from jobs.common import exit_on_error, parse, write_config
from jobs.drivers.best_of_n import run_best_of_n
from uprlhf.config import BestOfNConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(BestOfNConfig, __doc__, argv)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    with exit_on_error():
        run_best_of_n(cfg, out)


if __name__ == "__main__":
    main()
