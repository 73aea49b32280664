"""The error base of MoLE-Flow Edge: problems a user can fix, reported as one clear line."""


class MoleflowError(Exception):
    """A problem with the user's input, data, config, run or engine files; the message says what
    is wrong and names the file or key."""
