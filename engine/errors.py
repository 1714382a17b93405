"""Exceptions whose message is meant for the person using the app, not for a log."""


class UserFacingError(Exception):
    """Base of every error a user can cause; `str(err)` is a complete sentence to show them."""


class VideoError(UserFacingError):
    """The file is not a usable video (not a video, no stream, zero frames, corrupt, over a limit, decoder fault)."""


class QuestionError(UserFacingError):
    """The question is empty or too long."""


class ModelUnavailable(UserFacingError):
    """A preset's weights cannot be loaded (offline with no cache, missing files)."""


class OutOfMemory(UserFacingError):
    """The device ran out of memory even after retrying with fewer frames."""
