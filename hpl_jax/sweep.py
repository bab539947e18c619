"""`python -m hpl_jax.sweep`: runs a grid of configs (one workdir each) and resumes it.

A thin entry point: it runs hpl_jax/experiments/sweep.py as the program (`python -m hpl_jax.experiments.sweep`
is the same command).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpl_jax.experiments.sweep", run_name="__main__", alter_sys=True)
