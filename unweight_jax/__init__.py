"""unweight-jax."""
