"""Errors fdseg raises for bad input.

Every error about a file names the file and says what is wrong with it, so the
command line can print one clear line instead of a traceback.
"""
from __future__ import annotations

from pathlib import Path


class FdsegError(Exception):
    """Base class of the errors fdseg raises on purpose."""


class InputError(FdsegError, ValueError):
    """A user-supplied image, mask, folder or setting is unusable.

    ``source`` names the file (or the argument) and ``problem`` says why.
    """

    def __init__(self, source: str | Path | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


class MissingExtraError(FdsegError, ImportError):
    """An optional feature needs a package that is not installed."""

    def __init__(self, feature: str, extra: str | None, package: str):
        self.feature, self.extra, self.package = feature, extra, package
        how = f"pip install 'fdseg[{extra}]'" if extra else f"pip install '{package}'"
        super().__init__(f"{feature} needs the package '{package}': install it with  {how}")
