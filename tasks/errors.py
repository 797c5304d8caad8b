"""One exception family, so the CLI maps every expected failure to a clear message and exit code."""


class LetheError(Exception):
    """Base class of the errors Lethe expects and explains; the CLI prints them without a traceback."""

    exit_code = 1


class WorkspaceError(LetheError):
    """The workspace is missing, incomplete or not a Lethe workspace."""

    exit_code = 2


class ConfigurationError(LetheError):
    """A setting or secret is missing or invalid."""

    exit_code = 2


class InvalidRequestError(LetheError):
    """A deletion request failed validation; the reason never contains the subject id."""


class GateFailedError(LetheError):
    """Even the exact fallback could not produce a model that passes the data gates."""


class RunLockedError(LetheError):
    """Another run has the workspace's run lock."""

    exit_code = 3
