"""`python -m hpl_jax.mlrc`: the four cross-validation folds of "A Metric Learning Reality Check".

A thin entry point: it runs hpl_jax/experiments/mlrc.py as the program (`python -m hpl_jax.experiments.mlrc`
is the same command).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpl_jax.experiments.mlrc", run_name="__main__", alter_sys=True)
