"""Every failure reaches the user as a gr.Error message: theirs verbatim, ours as a generic line (logged here)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TypeVar

import gradio as gr

from engine.errors import UserFacingError

log = logging.getLogger("frame_arena.ui")
GENERIC_MESSAGE = "Something went wrong on our side while answering; it has been logged. Please try again."
Fn = TypeVar("Fn", bound=Callable)


def as_gr_error(err: Exception) -> gr.Error:
    """The gr.Error to raise for `err`: a user's mistake keeps its message; anything else never shows its text."""
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, UserFacingError):
        return gr.Error(str(err))
    log.exception("unexpected error in a UI handler", exc_info=err)
    return gr.Error(GENERIC_MESSAGE)


def user_errors(fn: Fn) -> Fn:
    """Wrap a handler (plain or generator) so it only ever raises gr.Error; the signature stays visible to gradio."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 -- the point: nothing but gr.Error may reach the user
                raise as_gr_error(err) from None

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- the point: nothing but gr.Error may reach the user
            raise as_gr_error(err) from None

    return plain  # type: ignore[return-value]
