"""`python -m hpl_jax.convert_weights`: converts PyTorch ImageNet weights into the format `model.pretrained` loads.

A thin entry point; the code is hpl_jax/models/convert.py.
"""
from hpl_jax.models.convert import run

if __name__ == "__main__":
    run()
