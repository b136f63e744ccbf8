"""Ray Tune over the harmful-prefix distribution and the loss weights (short LoRA trials on a
cheap proxy objective; the best configurations can get a full evaluation).

  python jobs/tune_prefix.py --plan       # per-trial resources x concurrent trials
  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune_prefix.py
Config: jobs/configs/tune_prefix.yaml (search space under tune.space).
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships this checkout to the cluster without installing it: put
# platform/ (the source root of the `derta` package) on this driver's path. Ray workers get it
# from the runtime env (PYTHONPATH=platform in jobs/runtime_env.yaml, see derta/runtime_env.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _job import main  # noqa: E402

CONFIG = "tune_prefix.yaml"  # in jobs/configs/


def run(cfg):
    from derta.tune.tuner import run_tune

    return run_tune(cfg)


if __name__ == "__main__":
    sys.exit(main(run, CONFIG, __doc__, stages=("tune",)))
