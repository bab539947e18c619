"""Experiments built on the trainer: what runs many runs or reads finished ones.

  sweep.py         a grid of configs times seeds, one workdir a run (`python -m hpl_jax.sweep`)
  report.py        tables and plots of a sweep's runs, paired differences with intervals (`hpl_jax.report`)
  mlrc.py          the four cross-validation folds of "A Metric Learning Reality Check" (`hpl_jax.mlrc`)
  mlrc_report.py   the MLRC protocol's report over those folds (`hpl_jax.mlrc_report`)
  evaluate.py      a run's checkpoint evaluated on a split, or its embeddings exported (`hpl_jax.evaluate`)
  visualize.py     retrieval grids, t-SNE and the learned hierarchy of a run (`hpl_jax.visualize`)
"""
