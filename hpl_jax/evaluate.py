"""`python -m hpl_jax.evaluate`: evaluates a run's checkpoint on a split, or exports its embeddings.

A thin entry point; the code is hpl_jax/experiments/evaluate.py.
"""
from hpl_jax.experiments.evaluate import run

if __name__ == "__main__":
    run()
