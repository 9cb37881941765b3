"""The run machinery: checkpoints, solver, run directory, distributed helpers, seeding and AMP."""
