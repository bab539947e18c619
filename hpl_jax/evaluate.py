"""`python -m hpl_jax.evaluate`: evaluates a run's checkpoint on a split, or exports its embeddings.

A thin entry point: it runs hpl_jax/experiments/evaluate.py as the program (`python -m hpl_jax.experiments.evaluate`
is the same command).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpl_jax.experiments.evaluate", run_name="__main__", alter_sys=True)
