"""`python -m hpl_jax.visualize`: pictures of a run: retrieval grids, t-SNE, the learned hierarchy.

A thin entry point: it runs hpl_jax/experiments/visualize.py as the program (`python -m hpl_jax.experiments.visualize`
is the same command).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpl_jax.experiments.visualize", run_name="__main__", alter_sys=True)
