"""`python -m hpl_jax.report`: tables and plots of a sweep's runs.

A thin entry point: it runs hpl_jax/experiments/report.py as the program (`python -m hpl_jax.experiments.report`
is the same command).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpl_jax.experiments.report", run_name="__main__", alter_sys=True)
