"""kiln: pre-train and fine-tune language models in JAX/Flax."""

from kiln import host_memory

host_memory.keep_freed_memory()
