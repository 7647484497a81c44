"""Task type -> handler callable: the `@task` decorator and config-named handlers.

Owns the table the fork server fills by importing preload modules (whose `@task`
decorators register) and resolving `[types."x"] handler = "module:function"`. Runs only
in the fork server and task processes; the supervisor never imports user code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Handler = Callable[..., object]  # not typing.Any: typing is kept out of the fork server

_handlers: dict[str, Handler] = {}


def task(name: str) -> Callable[[Handler], Handler]:
    """Register `fn(payload: dict, ctx: TaskContext)` (plain or async) for task type `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError("@task needs a non-empty type name, e.g. @task('llm.chat')")

    def register(fn: Handler) -> Handler:
        if not callable(fn):
            raise TypeError(f"@task({name!r}) must decorate a function")
        _handlers[name] = fn
        fn.__taskvisor_type__ = name
        return fn

    return register


def register(name: str, fn: Handler) -> None:
    _handlers[name] = fn


def resolve(spec: str) -> Handler:
    """Import "package.module:function" and return the function (ImportError/AttributeError)."""
    module_name, _, attr = spec.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


def lookup(name: str) -> Handler | None:
    return _handlers.get(name)


def names() -> list[str]:
    return sorted(_handlers)
