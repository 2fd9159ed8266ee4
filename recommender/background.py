"""An object that needs nothing the memory plans produce, built and used in a forked child while this process
imports torch and plans.

The quality models (scikit-learn and SciPy imported, a forest fitted to each benchmark's runs: about 1.5 s on a
small CPU) are such an object. On the command line they are built on a second core beside the torch import, and
this process asks the child for each candidate's figure, so it never imports scikit-learn itself.

The child is forked only while this process has not imported torch: it has then run no multi-threaded CPU op
(OpenMP's thread pool does not survive a fork). Otherwise, or when the child has died, the object is built here when
it is first used. The answers are the same either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_RESULT, _RAISED = "result", "raised"


def _serve(connection, parent_end, factory: Callable[..., Any], args: tuple) -> None:
    """The child: build the object, then answer (method, args) calls until the parent closes its end."""
    import signal

    parent_end.close()  # this copy of the parent's end, inherited by the fork, would keep the pipe open forever
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this child
    try:
        target = factory(*args)
    except BaseException:  # noqa: BLE001 - the parent builds it itself and raises what it raises there
        connection.close()
        return
    while True:
        try:
            method, call_args = connection.recv()
        except (EOFError, OSError):
            break
        try:
            reply = (_RESULT, getattr(target, method)(*call_args))
        except Exception as error:  # noqa: BLE001 - handed to the caller, who raises it
            reply = (_RAISED, error)
        try:
            connection.send(reply)
        except Exception as error:  # noqa: BLE001 - an unpicklable answer: say so instead
            connection.send((_RAISED, RuntimeError(f"{method}: {error}")))
    connection.close()


class ForkedService:
    """`factory(*args)` built in a forked child when `fork` is asked and safe, and its methods called there through
    a pipe with `call`; without a child, built here on the first call. Use it as a context manager: leaving ends
    the child."""

    def __init__(self, factory: Callable[..., Any], *args: Any, fork: bool = True):
        self._factory, self._args = factory, args
        self._here: Any = None
        self._process = self._connection = None
        self.forked = fork and sys.platform == "linux" and "torch" not in sys.modules
        if self.forked:
            import multiprocessing

            context = multiprocessing.get_context("fork")
            self._connection, child_end = context.Pipe()
            self._process = context.Process(target=_serve, args=(child_end, self._connection, factory, args),
                                            daemon=True)
            self._process.start()
            child_end.close()

    def __enter__(self) -> ForkedService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._process is not None:
            self._process.join(timeout=1)  # it leaves once it reads the closed pipe
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
            self._process = None

    def call(self, method: str, *args: Any) -> Any:
        """`method(*args)` of the object: in the child, or here once the child is gone."""
        if self._connection is not None:
            try:
                self._connection.send((method, args))
                kind, value = self._connection.recv()
            except (EOFError, OSError):  # the child died (or could not build the object): carry on here
                self.close()
            else:
                if kind == _RAISED:
                    raise value
                return value
        if self._here is None:
            self._here = self._factory(*self._args)
        return getattr(self._here, method)(*args)
