"""Errors every layer may raise: kept apart so that plug-ins (objectives, teacher contexts) can name
a config key without importing the config module that looks them up."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what was expected."""
