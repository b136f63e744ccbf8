"""Training stage: DeRTa losses (losses.py), the Ray Train worker loop (loop.py), FSDP2
sharding (fsdp.py), checkpoints and export (checkpoint.py), TorchTrainer assembly (trainer.py).

Entry point: `derta.train.trainer.train(cfg, paths, tracking) -> TrainResult`.
"""

from derta.train.trainer import TrainResult, plan_stages, train

__all__ = ["TrainResult", "plan_stages", "train"]
