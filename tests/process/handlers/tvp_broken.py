"""A preload module that fails to import: `taskvisor run` must stop with its traceback."""


def _fail():
    raise RuntimeError("tvp_broken fails to import on purpose")


_fail()
