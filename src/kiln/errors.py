"""The one exception type users see: a clear message, no traceback from inside JAX."""


class KilnError(Exception):
    """A problem with the user's input (config, data, workdir) and how to fix it."""
