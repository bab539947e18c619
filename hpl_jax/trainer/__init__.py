"""The trainer: one run from its config to its last checkpoint (`python -m hpl_jax.main` calls
`train.train_and_evaluate`).

  train.py          the loop, top to bottom: steps -> refresh of the groupings -> evaluation -> checkpoint
  train_state.py    TrainState (everything a run needs to continue exactly) and how it is created
  sharding.py       device meshes, per-device stacks and global arrays; `over_devices` (jit + shard_map)
  optim.py          the optimiser per parameter group (optax), learning rates, warm-up, per-level resets
  guards.py         the non-finite guard and the step metrics read one step behind
  evaluation.py     embedding the eval splits on the devices and the retrieval metrics of a run
  checkpointing.py  the workdir: config.json, metrics.json, orbax checkpoints, best/, resume checks
  restore.py        a run rebuilt from its workdir for the commands that read one without training
  reporting.py      progress lines, TensorBoard, metrics.json, early stopping
  preemption.py     SIGTERM -> a checkpoint at the next step boundary
  distributed.py    several processes: heartbeats, a peer's death named in one line, the resume point
  config_checks.py  every config field checked, one section at a time, before anything compiles or reads data
  pretraining.py    exporting a trained backbone, and what a run checks of the weights it fine-tunes from
  cli.py            flags, logging and one-line errors shared by the commands
"""
