"""Task type -> handler callable: the `@task` decorator and config-named handlers, and the
`@warm_up` functions the fork server runs once after its preload.

Owns the table the fork server fills by importing preload modules (whose `@task`
decorators register) and resolving `[types."x"] handler = "module:function"`, and the
list of warm-ups. Runs only in the fork server and task processes; the supervisor never
imports user code. A warm-up never runs in a task process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Handler = Callable[..., object]  # not typing.Any: typing is kept out of the fork server

_handlers: dict[str, Handler] = {}
_warm_ups: list[Callable[[], object]] = []


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


def warm_up(fn: Callable[[], object]) -> Callable[[], object]:
    """Register `fn()` to run once in the fork server, after every preload module is
    imported and before the first fork; never in a task process (a module a task imports
    itself registers it, and that is all). For code that every task runs: what a first
    run writes (the interpreter's caches, the first objects of each size) is then written
    once, in the memory each task process starts from, instead of copied into each of
    them. It must not block, touch the network or leave threads or open files behind. An
    exception is logged by the supervisor as a warning; the fork server starts anyway."""
    if not callable(fn):
        raise TypeError("@warm_up must decorate a function that takes no arguments")
    _warm_ups.append(fn)
    return fn


def run_warm_ups() -> list[str]:
    """Run the registered warm-ups (the fork server, once); what went wrong, one line each."""
    errors = []
    for fn in _warm_ups:
        try:
            fn()
        except Exception as exc:
            name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
            errors.append(f"warm-up {name} failed: {type(exc).__name__}: {exc}"[:2000])
    return errors
