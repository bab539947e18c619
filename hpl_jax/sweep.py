"""`python -m hpl_jax.sweep`: runs a grid of configs (one workdir each) and resumes it.

A thin entry point; the code is hpl_jax/experiments/sweep.py.
"""
from hpl_jax.experiments.sweep import run

if __name__ == "__main__":
    run()
