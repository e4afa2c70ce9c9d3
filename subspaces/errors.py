"""The errors a user can cause, each raised with a message that names the problem and the fix.

The recipes turn them into one line on stderr and an exit status (:func:`subspaces.cli.run`):
2 for :class:`ConfigError`, :class:`CheckpointError` and :class:`DatasetNotFoundError`,
3 for :class:`NonFiniteLossError`, 75 (EX_TEMPFAIL: try again) for :class:`Preempted`, 1 for
:class:`MemberFailed` (a crash, not bad input).
"""

from __future__ import annotations


#: exit status of a run stopped by SIGTERM / SIGINT with a checkpoint to resume from (EX_TEMPFAIL)
PREEMPTED_STATUS = 75


class ConfigError(ValueError):
    """A bad flag, config file or combination of options; the message says how to fix it."""


class ConfigTypeError(ConfigError, TypeError):
    """A bad input of the wrong type (a string where a list is needed, not a model): a
    :class:`ConfigError` that ``except TypeError`` also catches."""


class CheckpointError(ValueError):
    """A file that is missing, truncated, corrupted or of the wrong kind; the message names it."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset could not be found or fetched; the message says how to get it."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """The run stopped on SIGTERM / SIGINT after finishing its current step and writing a checkpoint
    that ``--resume`` continues exactly; the message names the step and the folder."""


class MemberFailed(RuntimeError):
    """A comparison member's worker process crashed or was killed (not bad input); the message
    names the member, its exit status and its log. The recipes exit with status 1."""
