"""Errors zojax raises at its boundaries; each message is one line naming the culprit."""


class ConfigError(ValueError):
  """A config file, key or value is wrong; the message names it."""
