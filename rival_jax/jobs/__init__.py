"""The commands the CLI runs, one module each (`generate`, `augment`, `evaluate`, `ablate`, `make_tiny`: `run_job`).

Their options are defined once in `jobs.options`; `common`, `settings`, `manifest`, `records` and `locks`
are what the jobs share.
"""
