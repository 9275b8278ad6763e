"""The version, defined once: the package, the CLI, the metrics and the agent's hello read it."""

__version__ = "0.1.0"
