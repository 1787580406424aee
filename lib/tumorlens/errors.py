"""Typed errors: every bad input names the file and the problem instead of a deep traceback."""

from __future__ import annotations

from pathlib import Path


class TumorlensError(Exception):
    """Base class of all errors raised on purpose by tumorlens."""


class InvalidInputError(TumorlensError, ValueError):
    """A file (or array) cannot be used: corrupt, empty, wrong type, wrong dimensionality..."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}")


class ManifestError(InvalidInputError):
    """A dataset manifest is missing, malformed, or names unknown labels or missing files."""


class ModelNotFoundError(TumorlensError, LookupError):
    """No model of that name (or path) in the registry."""


class RegistrationError(TumorlensError):
    """Registration to the template failed or did not converge to a usable result. ``problem`` is the
    message without the file's path: what a findings record may quote (a path can name a patient)."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path or 'volume'}: {problem}")


class TrainingDivergedError(TumorlensError, ArithmeticError):
    """A training run's loss or weights stopped being finite numbers (a learning rate far too high):
    nothing is saved or published from it."""


UNREACHABLE_ERRORS = frozenset({
    "TimeoutError", "ConnectionError", "APITimeoutError", "APIConnectionError", "TimeoutException", "ConnectError",
    "ConnectTimeout", "ReadTimeout", "Timeout", "ConnectionRefusedError", "MaxRetryError", "NewConnectionError",
    "RetryError"})


def unreachable(e: BaseException | None) -> bool:
    """A server (a report backend, a PACS) timed out or could not be reached, by the class names of the error
    and its causes: httpx, openai, requests, urllib3 and the standard library each have their own."""
    seen = 0
    while e is not None and seen < 5:
        if any(c.__name__ in UNREACHABLE_ERRORS for c in type(e).__mro__):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False
