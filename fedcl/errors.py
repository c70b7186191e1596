"""One exception type for bad user input, so the CLI can print it without a traceback."""


class ConfigError(ValueError):
    """A configuration value a user must change; the message names the value and what is allowed."""
