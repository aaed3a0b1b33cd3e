"""hyperlaw trainer: DeepSpeed data-parallel trainings and the Ray sweeps that run them.

One run: ``config`` (TrainConfig, batch layout) → ``model`` and ``data`` → ``engine``
(DeepSpeed: process group, engine, one optimizer step, checkpoints) and ``schedule``
(learning rate, evaluation steps, EWA) → ``train`` (the per-worker loop) → ``telemetry``
(points to the service). A sweep: ``sweep_config`` (the YAML and its JSON Schema) → ``plan``
(runs, idempotency keys, trial records) → ``sweep`` (Ray Tune and Ray Train). ``cli``: the
``hyperlaw sweep`` and ``hyperlaw corpus`` commands.
"""
