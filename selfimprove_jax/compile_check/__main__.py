"""``python -m selfimprove_jax.compile_check``: see the package docstring."""
from selfimprove_jax.compile_check.command import run

run()
