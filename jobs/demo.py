"""The built-in demo as a Ray job: a tiny Llama, the synthetic corpus, 2 CPU training workers.

The same job runs on a laptop and on any cluster:
  python jobs/demo.py
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/demo.py
Config: the built-in demo (platform/derta/configs/demo.yaml, what `derta run` uses).
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships this checkout to the cluster without installing it: put
# platform/ (the source root of the `derta` package) on this driver's path. Ray workers get it
# from the runtime env (PYTHONPATH=platform in jobs/runtime_env.yaml, see derta/runtime_env.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _job import main  # noqa: E402
from derta.config import DEMO_CONFIG  # noqa: E402
from derta.pipeline import run_all  # noqa: E402

CONFIG = DEMO_CONFIG  # the built-in demo, the same file `derta run` uses

if __name__ == "__main__":
    sys.exit(main(run_all, CONFIG, __doc__))
