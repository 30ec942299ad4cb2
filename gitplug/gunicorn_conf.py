"""Gunicorn server hooks for gitplug: ``gunicorn -c python:gitplug.gunicorn_conf ...``.

* ``post_worker_init``: as soon as a worker has loaded the application (or
  inherited it from the master with ``--preload``), it converges on the
  live releases, registers its heartbeat and joins the controller election,
  before it serves its first request. A worker recycled by
  ``--max-requests`` therefore never serves a stale release. It then
  freezes what it has loaded out of the garbage collector's way
  (``gc.freeze()``), which keeps full collections short during swaps.
* ``worker_exit``: the worker leaves the election and removes its heartbeat,
  so ``gitplug status`` stops listing it at once.

Import this module's hooks into your own gunicorn config if you have one::

    from gitplug.gunicorn_conf import post_worker_init, worker_exit
"""

from __future__ import annotations

import gc
import typing as t

__all__ = ["post_worker_init", "worker_exit", "find_gitplug_state"]


def find_gitplug_state(wsgi: t.Any) -> t.Any | None:
    """The gitplug state of the Flask app behind a WSGI callable, if any."""
    seen = 0
    while wsgi is not None and seen < 10:
        extensions = getattr(wsgi, "extensions", None)
        if isinstance(extensions, dict) and "gitplug" in extensions:
            return extensions["gitplug"]
        wsgi = getattr(wsgi, "app", None) or getattr(wsgi, "wsgi_app", None)
        seen += 1
    return None


def post_worker_init(worker: t.Any) -> None:
    state = find_gitplug_state(getattr(worker, "wsgi", None))
    if state is not None and state.services is not None:
        state.services.ensure_started()
    # Everything loaded so far (Flask, the host app, the live releases) lives
    # as long as the worker: keep it out of the collector's full passes, which
    # otherwise pause a swap for tens of milliseconds.
    gc.collect()
    gc.freeze()


def worker_exit(server: t.Any, worker: t.Any) -> None:
    state = find_gitplug_state(getattr(worker, "wsgi", None))
    if state is not None and state.services is not None:
        state.services.shutdown()
