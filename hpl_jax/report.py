"""`python -m hpl_jax.report`: tables and plots of a sweep's runs.

A thin entry point; the code is hpl_jax/experiments/report.py.
"""
from hpl_jax.experiments.report import run

if __name__ == "__main__":
    run()
