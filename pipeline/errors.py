"""The errors a user can act on, at the bottom of the package so that every layer raises them."""


class ConfigError(ValueError):
    """A parameter value a user can fix; the message names the value and what is allowed."""
