"""HTML reports from MLflow and the run directory (`derta report`, and the end of `derta run`).

data.py   what a report shows, read back per run (files + MLflow) or per experiment
plots.py  the figures (matplotlib PNG data URIs)
html.py   the pages: write_report (one run) and write_experiment_report (every run)
"""
