"""Sweeps: budget-matched grids of layer-wise and uniform OpenELM-style models.

    python -m sweeps.run GRID.yaml [--out DIR] [--dry-run] [--shard I/N] [--retry-failed]
    python -m sweeps.status SWEEP_DIR

Modules, one concern each:

* ``grid``     load and validate a grid file (strict YAML, base config, match settings)
* ``axes``     parse each axis and check that the axes fit together
* ``expand``   zip groups, exclude rules, and the product into cells
* ``problems`` collected, located grid errors
* ``arms``     allocation arms (OpenELM bounds, depth schedules, per-layer lists, uniform)
* ``tokens``   token budgets: a count, tokens per parameter, or from a FLOP budget
* ``budget``   solve the width (and, for uniform twins, multipliers) that hits a budget
* ``plan``     cells -> named runs with their uniform twins; the dry-run table
* ``rows``     the planned columns of each run's row in the results table
* ``naming``   run names: readable label + hash of the resolved config
* ``locks``    atomic per-run locks with heartbeat and stale-lock takeover
* ``shard``    deterministic split of a plan over array-job tasks
* ``results``  results.parquet / results.csv rebuilt from the run directories
* ``driver``   run the plan: skip, resume, retry, isolate failures
* ``progress`` the sweep-level progress bar
* ``run``, ``status``  the two command lines

Everything except ``driver`` (which trains) is pure Python: planning and
status never import JAX.
"""
