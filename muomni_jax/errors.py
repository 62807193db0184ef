"""The one exception type that launchers turn into a one-line message instead of a traceback."""


class UserError(Exception):
  """A problem with the user's input or config, with the fix in its message.

  Raised before anything in save_dir is written, so a bad input never damages a run.
  """
