"""Errors meant for people: one line each, shown without a traceback, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (recipe, data, flags). The CLI prints ``str(err)`` and exits with 2."""

    exit_code = 2


class StorageError(UserError):
    """Object storage kept failing (after retries) or refused: the command stops, nothing is deleted."""

    exit_code = 3


class CheckpointWriteError(StorageError):
    """Writing a checkpoint failed (disk full, storage unreachable after retries): the run stops
    with one line naming where and why, exit 1. A re-run removes the partial checkpoint and resumes."""

    exit_code = 1

    def __init__(self, uri: str, cause: str):
        self.uri, self.cause_text = uri, cause
        super().__init__(f"writing checkpoint {uri} failed: {cause}; the run stopped. Once the storage works "
                         "again, run the same command: it resumes from the newest complete checkpoint")

    def __reduce__(self):  # survives pickling through Ray Train's worker errors
        return (CheckpointWriteError, (self.uri, self.cause_text))


class DataError(UserError):
    """One or more problems in a dataset, each already formatted as ``file:line: field: problem``."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        super().__init__(self.render())

    def render(self, limit: int = 20) -> str:
        lines = self.problems[:limit]
        if self.total > len(lines):
            lines.append(f"... and {self.total - len(lines)} more problem(s)")
        return "\n".join(lines)

    def __reduce__(self):  # survives pickling through Ray tasks
        return (DataError, (self.problems, self.total))


def unwrap_user_error(err: BaseException) -> UserError | None:
    """The UserError behind ``err``, found through wrappers such as Ray's RayTaskError. Ray makes
    that wrapper an instance of the cause's class too, so ``.cause`` is followed before isinstance."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            stack.append(cause)
            continue
        # Ray Train V2 keeps the workers' and the controller's errors in fields, not as a cause.
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
        controller = getattr(e, "controller_failure", None)
        if isinstance(controller, BaseException):
            stack.append(controller)
        if isinstance(e, UserError):
            return e
        stack += [e.__cause__, e.__context__]
    return None
