"""Errors a user can cause. The CLI prints their message as one sentence and exits non-zero."""


class WanfitError(Exception):
    """Base class: the message is a complete sentence meant for the user."""


class ConfigError(WanfitError):
    """Bad settings: size, frame count, steps, unknown names."""


class CheckpointError(WanfitError):
    """A model file or folder is missing, corrupt, of an unknown layout, or of another model."""


class AttentionUnavailableError(WanfitError):
    """A forced attention backend cannot run on this machine."""


class PlanError(WanfitError):
    """No plan fits the memory budget."""


class OutputError(WanfitError):
    """The output could not be written (disk full, permissions changed mid-run)."""


class ParallelError(WanfitError):
    """A run on several processes cannot start, or one of its processes failed or vanished."""


class WanfitWarning(UserWarning):
    """Something the user should know, said in one sentence (the CLI prints it as `wanfit: warning:`)."""


def one_line(err: BaseException) -> str:
    """An exception as one short line for a warning or a record: its type and its message's first line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
