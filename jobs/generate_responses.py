"""Fill in the safety triples: harmful responses from a deliberately unaligned model and safe
responses from an aligned one (paper §3.1), with inference engines on GPUs, then build the
transition samples from them (`derta data build` with data.generate on).

  python jobs/generate_responses.py --plan    # one engine plan per generation model
  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/generate_responses.py \\
      --set storage.run_name=gen-3k
The completed triples are Parquet under <storage.root>/gen-3k/data/generated/safety-<hash>/: point a
training job at them with --set data.safety.uri=<that directory> data.safety.format=parquet.
Config: jobs/configs/generate_responses.yaml (data.safety: the questions; data.generate: models).
"""

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships this checkout to the cluster without installing it: put
# platform/ (the source root of the `derta` package) on this driver's path. Ray workers get it
# from the runtime env (PYTHONPATH=platform in jobs/runtime_env.yaml, see derta/runtime_env.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from _job import main  # noqa: E402

CONFIG = "generate_responses.yaml"  # in jobs/configs/


def run(cfg):
    from derta.pipeline import build_data

    return build_data(cfg)  # data.generate fills the missing responses first (derta.data.generate)


def plan(cfg) -> bool:
    """Size every generation model (they are not cfg.model)."""
    from derta.config import ConfigError
    from derta.plan import print_plan

    g = cfg.data.generate
    models = [m for m in (g.harmful_model, g.safe_model) if m] if g else []
    if not models:
        raise ConfigError("data.generate: set harmful_model and/or safe_model")
    fits = [print_plan(cfg, ("generate",), model=m, show_config=(i == 0)) for i, m in enumerate(models)]
    return all(fits)


if __name__ == "__main__":
    sys.exit(main(run, CONFIG, __doc__, stages=("generate",), plan=plan))
