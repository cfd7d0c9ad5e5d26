"""The one exception type for mistakes a user can fix (bad file, field or value).

The CLI prints a :class:`UserError` as one clear line and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file, field or value."""
