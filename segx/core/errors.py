"""One exception type for input a user can fix, so entry points print it as a paragraph, not a trace."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class SegxError(RuntimeError):
    """A problem with the user's data, config or files; the message names the culprit and the fix."""


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then each `__cause__` or `__context__` behind it, each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__


def find_in_chain(error: BaseException, wanted: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in `error`'s chain (itself, then each `__cause__` or `__context__`) that is `wanted`."""
    return next((current for current in exception_chain(error) if wanted(current)), None)


def find_user_error(error: BaseException) -> SegxError | None:
    """The SegxError behind `error`, if any: Hydra's `instantiate` wraps constructor errors in its own."""
    found = find_in_chain(error, lambda e: isinstance(e, SegxError))
    return found if isinstance(found, SegxError) else None


@contextmanager
def exit_on_user_error(exit_code: int = 2) -> Iterator[None]:
    """Turn a user-fixable error into one logged paragraph and a non-zero exit; let real bugs trace."""
    try:
        yield
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        logging.getLogger("segx").error("%s", user_error)
        sys.exit(exit_code)


class ConfigError(SegxError, ValueError):
    """A config value out of range (a width, a size, a name); still a ValueError for library callers."""


class DatasetUnavailableError(SegxError):
    """The dataset at data.root cannot be read (missing, incomplete, not downloadable): every job of a sweep that
    reads the same data would fail the same way."""


class DataRootTakenError(SegxError, FileExistsError):
    """A generated dataset would overwrite a folder that is not ours."""


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (or of a text), for one-line summaries; the type's name when empty."""
    text = str(error).strip()
    if not text and isinstance(error, BaseException):
        return type(error).__name__
    return text.splitlines()[0] if text else ""
