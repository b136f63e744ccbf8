"""The science check as a Ray job: refusal position bias and the paper's Table-4 ablation.

A "pretraining" run makes the tiny model comply with (synthetic) harmful requests; four
safety-tuning arms (vanilla, + harmful prefix, + RTO, DeRTa) start from it with equal safety
data; the prefill attack at k = 0/5/10/20 on held-out and seen topics shows where each arm
refuses. On 2 CPU cores in under 15 minutes:
  python jobs/position_bias.py [--set position_bias.seed=1]
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/position_bias.py
Same as `derta run --preset position_bias`. Config: platform/derta/configs/position_bias.yaml.
"""

import sys
from pathlib import Path

# Ray job working dirs are not installed: see jobs/demo.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _job import main  # noqa: E402
from derta.config import POSITION_BIAS_CONFIG  # noqa: E402
from derta.experiments.position_bias import run_position_bias  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(run_position_bias, POSITION_BIAS_CONFIG, __doc__))
