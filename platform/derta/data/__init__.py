"""The data stage: raw sources -> transition samples (Parquet) -> fixed-length training rows.

Entry points (docs/ARCHITECTURE.md): derta.data.pipeline.build(cfg, paths) -> DataManifest and
derta.data.pipeline.training_dataset(cfg, paths, kinds=None) -> ray.data.Dataset.
Pure pieces (no Ray): sources.normalize/iter_raw, templates, prefix, transitions, tokenize, mix.
"""
