"""Scripts that print figures (`python -m hpl_jax.benchmarks.<name>`); never asserted in tests."""
