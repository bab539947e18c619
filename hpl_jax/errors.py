"""The errors a user can fix, which the commands print as one line (hpl_jax/trainer/cli.py) instead of a traceback.

They live below every layer that raises them: the data layer checks the dataset fields it alone can check (how
many classes a dataset holds) and the trainer checks the rest.
"""


class ConfigError(ValueError):
    """A config value a user can fix; the message names the field (`config.<field>: <problem>`)."""


class DataError(ValueError):
    """Data a user can fix (missing, unprepared or malformed files); the message says what to do."""


def require(condition: bool, field: str, problem: str) -> None:
    """Raises ConfigError('config.<field>: <problem>') unless `condition`."""
    if not condition:
        raise ConfigError(f"config.{field}: {problem}")
