"""The errors anychip raises for what a restart cannot fix: each names what is wrong.

The command line prints them as one line (``anychip: ...``, exit status 2) instead of a
traceback, and a worker that raises one writes ``fatal.json`` so that the launcher does
not restart it into the same error.
"""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or impossible; the message names the file
    (or ``--set``), the key, the value and what was expected."""


class CheckpointError(RuntimeError):
    """A checkpoint or Hugging Face directory is missing, unreadable, corrupt, or does not
    fit the configuration."""


class DeviceError(RuntimeError):
    """The requested device is not available, or not usable as asked."""


class GuardStop(RuntimeError):
    """A guard ended the run: a restart cannot fix what it found (not retried by the launcher)."""


# what the command line reports in one line and the launcher never restarts
UNRECOVERABLE = (ConfigError, CheckpointError, DeviceError, GuardStop, FileNotFoundError)
