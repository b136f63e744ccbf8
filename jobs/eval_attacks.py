"""The paper's attacks (prefill, CompletingAttack, CodeAttack, JailbreakChat, SelfCipher) and
helpfulness sets against a model, with vLLM engines and an LLM judge on GPUs.

  python jobs/eval_attacks.py --plan
  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/eval_attacks.py \\
      --set model.name_or_path=s3://YOUR-BUCKET/derta/runs/RUN/model
A run's own model is used when --set storage.run_name=RUN names a trained run.
Config: jobs/configs/eval_attacks.yaml.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships this checkout to the cluster without installing it: put
# platform/ (the source root of the `derta` package) on this driver's path. Ray workers get it
# from the runtime env (PYTHONPATH=platform in jobs/runtime_env.yaml, see derta/runtime_env.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _job import main  # noqa: E402
from derta.pipeline import eval_only  # noqa: E402

CONFIG = "eval_attacks.yaml"  # in jobs/configs/

if __name__ == "__main__":
    sys.exit(main(eval_only, CONFIG, __doc__, stages=("eval",)))
