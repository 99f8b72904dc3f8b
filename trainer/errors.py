"""The one error a user sees for a bad input: which input, what is wrong, how to fix it."""
from __future__ import annotations


class NodeInputError(ValueError):
    """A user-facing error about one node input, raised before any work."""

    def __init__(self, input_name: str, problem: str, fix: str) -> None:
        super().__init__(f"{input_name}: {problem}. {fix}")
        self.input_name, self.problem, self.fix = input_name, problem, fix
