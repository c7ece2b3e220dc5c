"""The errors a user can fix: each carries messages that name the key, the value and what is accepted."""

from __future__ import annotations


class LoraSearchError(Exception):
    """A problem with the user's input, reported as one line per problem and no traceback."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class ConfigError(LoraSearchError):
    """The composed configuration is invalid."""


class DataError(LoraSearchError):
    """The data cannot be loaded or does not have the columns of its layout."""


class RunDiverged(Exception):
    """A run trained to its end with a NaN or infinite loss: recorded as failed (its metrics kept), exit code 1."""

    def __init__(self, reason: str, run_dir):
        self.reason, self.run_dir = reason, run_dir
        super().__init__(f"{reason} (recorded in {run_dir})")
