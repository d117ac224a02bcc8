"""The one exception type users see: a clear message, no traceback from inside JAX."""


class KilnError(Exception):
    """A problem with the user's input (config, data, workdir) and how to fix it."""


def config_error(key: str, value: object, why: str, fix: str) -> KilnError:
    """The error for config key `key` (dotted, e.g. "model.d_model") holding `value`: what is
    wrong with it and how to fix it, in the one format every config rule uses."""
    return KilnError(f"config: {key}={value!r} {why}. {fix}")
