"""`python -m hpl_jax.mlrc_report`: the MLRC protocol's report over the folds of a `hpl_jax.mlrc` run.

A thin entry point: it runs hpl_jax/experiments/mlrc_report.py as the program (`python -m hpl_jax.experiments.mlrc_report`
is the same command).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpl_jax.experiments.mlrc_report", run_name="__main__", alter_sys=True)
