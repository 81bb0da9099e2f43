"""The error raised for files that cannot be read as weights."""


class FormatError(ValueError):
    """A file is not in a format sparsecore reads, or is truncated or corrupt."""
