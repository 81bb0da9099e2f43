"""The errors of offline pruning, in one place: what the command line turns into one line."""


class FormatError(ValueError):
    """A file is not in a format sparsecore reads, or is truncated or corrupt."""


class UserError(ValueError):
    """An error in what the user asked for (the command line prints it in one line)."""
