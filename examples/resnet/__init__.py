"""Flax ResNet data-parallel training with jax_ddl reducing the gradients."""
