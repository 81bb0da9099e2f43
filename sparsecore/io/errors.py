"""The errors of offline pruning, in one place: what the command line turns into one line."""


class FormatError(ValueError):
    """A file is not in a format sparsecore reads, or is truncated or corrupt."""


class UserError(ValueError):
    """An error in what the user asked for (the command line prints it in one line).

    ``cli``: the same message in the command line's words (its flags, where
    the message names a keyword argument), printed there instead."""

    def __init__(self, message, *, cli=None):
        super().__init__(message)
        self.cli = cli
