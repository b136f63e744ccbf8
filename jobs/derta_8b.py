"""DeRTa on Llama-3-8B, full fine-tuning with the paper's hyper-parameters, on one 8-GPU node.

  python jobs/derta_8b.py --plan          # resources + per-GPU memory; exit 1 if it cannot fit
  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/derta_8b.py \\
      --set storage.root=s3://YOUR-BUCKET/derta/runs
Config: jobs/configs/derta_8b.yaml (data -> FSDP2 training -> vLLM attacks -> report).
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships this checkout to the cluster without installing it: put
# platform/ (the source root of the `derta` package) on this driver's path. Ray workers get it
# from the runtime env (PYTHONPATH=platform in jobs/runtime_env.yaml, see derta/runtime_env.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _job import main  # noqa: E402
from derta.pipeline import run_all  # noqa: E402

CONFIG = "derta_8b.yaml"  # in jobs/configs/

if __name__ == "__main__":
    sys.exit(main(run_all, CONFIG, __doc__))
