"""kiln: pre-train and fine-tune language models in JAX/Flax."""
