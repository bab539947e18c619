"""`python -m hpl_jax.mlrc_report`: the MLRC protocol's report over the folds of a `hpl_jax.mlrc` run.

A thin entry point; the code is hpl_jax/experiments/mlrc_report.py.
"""
from hpl_jax.experiments.mlrc_report import run

if __name__ == "__main__":
    run()
