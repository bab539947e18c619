"""`python -m hpl_jax.convert_weights`: converts PyTorch ImageNet weights into the format `model.pretrained` loads.

A thin entry point: it runs hpl_jax/models/convert.py as the program (`python -m hpl_jax.models.convert`
is the same command).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpl_jax.models.convert", run_name="__main__", alter_sys=True)
