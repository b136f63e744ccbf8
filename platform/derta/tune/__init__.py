"""derta.tune: Ray Tune over the prefix-length distribution, the loss weights and lr.

space.py   tune.space (dotted keys -> Ray Tune samplers), validation, trial configs
proxy.py   the cheap proxy objective (transition score + helpful NLL), pure torch + the
           training-loop hook that reports it to Tune
tuner.py   `derta tune`: Tuner over a trial driver that fits a TorchTrainer per trial, ASHA,
           random / Optuna search, resume, MLflow parent + nested runs, best config YAML
"""
