"""`python -m hpl_jax.visualize`: pictures of a run: retrieval grids, t-SNE, the learned hierarchy.

A thin entry point; the code is hpl_jax/experiments/visualize.py.
"""
from hpl_jax.experiments.visualize import run

if __name__ == "__main__":
    run()
