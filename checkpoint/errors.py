"""The error raised for a quantized model directory that cannot be used as it is.

Every :class:`CheckpointError` names where (the model directory or file), what (the tensor or JSON
key at fault) and the problem (what was expected and what was found), so that the message alone
tells a user which file to fix. Several problems found in one pass are raised together as one
:class:`CheckpointError` whose :attr:`~CheckpointError.problems` lists each of them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A problem with a quantized checkpoint (a ``ValueError``).

    Args:
        where: the model directory (or the file inside it) that holds the problem.
        key: the tensor name, JSON key or file name at fault (``None`` for the whole directory).
        problem: what was expected and what was found.

    ``str(err)`` is ``"<where>: <key>: <problem>"``. :meth:`combine` builds one error out of
    several; its :attr:`problems` holds the individual errors (a single error lists itself).
    """

    def __init__(self, where: str, key: str | None, problem: str):
        self.where = str(where)
        self.key = key
        self.problem = problem
        self.problems: tuple[CheckpointError, ...] = (self,)
        super().__init__(f"{self.where}: {key}: {problem}" if key else f"{self.where}: {problem}")

    @classmethod
    def combine(cls, where: str, errors: Sequence[CheckpointError]) -> CheckpointError:
        """One error for ``errors`` (returned unchanged when there is exactly one)."""
        if not errors:
            raise ValueError("CheckpointError.combine: no errors given")
        if len(errors) == 1:
            return errors[0]
        lines = "\n".join(f"  - {e}" for e in errors)
        err = cls(where, None, f"{len(errors)} problems:\n{lines}")
        err.problems = tuple(errors)
        return err
