"""The experiment runner: a run's config and directory, the stage loop over seeds, orders, methods
and stages, the worker pool, cluster launches, sweeps, ``mera plan``, inference profiles, progress
and telemetry. It sits above :mod:`mera.continual` (the method: one stage's training, merges,
strategies, checkpoints), which never imports it."""
