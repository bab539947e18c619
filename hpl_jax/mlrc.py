"""`python -m hpl_jax.mlrc`: the four cross-validation folds of "A Metric Learning Reality Check".

A thin entry point; the code is hpl_jax/experiments/mlrc.py.
"""
from hpl_jax.experiments.mlrc import run

if __name__ == "__main__":
    run()
