"""Exceptions raised by the library: each names the problem in one line."""


class SPMError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(SPMError, ValueError):
    """A concept spec or trainer config is invalid; the message lists every problem found."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


class ModelLoadError(SPMError, OSError):
    """A base model could not be loaded."""


class UnsupportedModelError(SPMError, ValueError):
    """The loaded model is not of a family the library supports."""


class MembraneFormatError(SPMError, ValueError):
    """A membrane file is unreadable, incomplete or holds invalid values."""


class IncompatibleMembraneError(SPMError, ValueError):
    """A membrane does not fit the UNet it is being attached to."""
