"""Exceptions raised by the library: each names the problem in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SPMError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(SPMError, ValueError):
    """A concept spec or trainer config is invalid; the message lists every problem found."""

    def __init__(self, what: str, problems: list[str]):
        self.what = what
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))

    def __reduce__(self):  # crosses process boundaries (Ray) intact, with attributes added on the way
        return type(self), (self.what, self.problems), self.__dict__


class ModelLoadError(SPMError, OSError):
    """A base model could not be loaded."""


class UnsupportedModelError(SPMError, ValueError):
    """The loaded model is not of a family the library supports."""


class MembraneFormatError(SPMError, ValueError):
    """A membrane file is unreadable, incomplete or holds invalid values."""


class IncompatibleMembraneError(SPMError, ValueError):
    """A membrane does not fit the UNet it is being attached to."""


class TrainingDivergedError(SPMError, RuntimeError):
    """A concept's loss became NaN or infinite."""

    def __init__(self, concepts: list[str], step: int):
        self.concepts = list(concepts)
        self.step = step
        super().__init__(f"loss of {', '.join(self.concepts)} is not finite at step {step}; "
                         "lower the learning rate or check the prompts")

    def __reduce__(self):
        return type(self), (self.concepts, self.step), self.__dict__


class ClusterError(SPMError, ConnectionError):
    """The Ray cluster could not be reached or used."""
