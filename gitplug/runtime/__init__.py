"""The runtime part: plugins inside the running Flask process. Knows nothing of git.

Owns what serves requests: the :class:`~gitplug.Plugin` API, isolated import
of a release directory, registration into a private app, the immutable
snapshot of live releases each request is pinned to, and the atomic swap.

- :mod:`.plugin`: :class:`Plugin`, ``current_plugin`` (public through :mod:`gitplug`).
- :mod:`.loader`: isolated import of a release under a private namespace.
- :mod:`.loaded`: a release registered into a private app and harvested
  (:class:`LoadedRelease`, :func:`build_release`).
- :mod:`.snapshot`: :class:`Snapshot`, the set of live releases a request reads.
- :mod:`.pinning`: WSGI middleware pinning each request to one snapshot.
- :mod:`.routing`, :mod:`.hooks`, :mod:`.templating`: Flask's lookups
  (URL adapter, view functions and hooks, Jinja) answered from the snapshot.
- :mod:`.swap`: :class:`Runtime`: verify, publish, unload, the reaper.
- :mod:`.codecache`: compiled Python and Jinja code shared between processes.
- :mod:`.devdir`: directory snapshots and the watcher of ``serve --dev``.
- :mod:`.environ`: the WSGI environ keys the runtime sets.
- :mod:`.manifest`: what a release directory holds, checked before it is loaded.
- :mod:`.canary`: a canary's split: which side serves a request (sticky per client).

May import: the base (:mod:`gitplug.errors`, :mod:`gitplug.signals`,
:mod:`gitplug.prefixes`) only. The deploy part drives it; it never calls back.
"""
