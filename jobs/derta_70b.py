"""DeRTa on Llama-3-70B, LoRA over FSDP2 on 16 GPUs (two 8-GPU nodes), the paper's LoRA recipe.

  python jobs/derta_70b.py --plan         # resources + per-GPU memory; exit 1 if it cannot fit
  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/derta_70b.py \\
      --set storage.root=s3://YOUR-BUCKET/derta/runs
The autoscaler adds the GPU nodes when training asks for them and removes them when idle.
Config: jobs/configs/derta_70b.yaml.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships this checkout to the cluster without installing it: put
# platform/ (the source root of the `derta` package) on this driver's path. Ray workers get it
# from the runtime env (PYTHONPATH=platform in jobs/runtime_env.yaml, see derta/runtime_env.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _job import main  # noqa: E402
from derta.pipeline import run_all  # noqa: E402

CONFIG = "derta_70b.yaml"  # in jobs/configs/

if __name__ == "__main__":
    sys.exit(main(run_all, CONFIG, __doc__))
