"""Error kinds that decide how a failure is reported and whether it is retried."""


class UserError(Exception):
    """Bad config, missing path, no data left: said in one paragraph, exit code 2, never retried."""


class TransientError(Exception):
    """Network or I/O trouble that a retry may fix."""
