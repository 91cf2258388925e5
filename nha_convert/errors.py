"""User-facing errors: one line that names the fix. The CLIs print them without a traceback."""


class NHAError(Exception):
    """A problem with the user's input (model, settings, paths, recipe), stated in one line."""
