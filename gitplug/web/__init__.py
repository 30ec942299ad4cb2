"""The web part: gitplug's HTTP face, mounted under ``api_prefix``.

- :mod:`.admin`: the blueprint: JSON API, webhook route, metrics route.
- :mod:`.webhook`: signature checks and push matching per forge.
- :mod:`.statuspage` (routes, login, CSRF) and :mod:`.statusview` (what
  the page shows of each plugin).
- :mod:`.metrics`: Prometheus text, fed by the pipeline's signals.
- :mod:`.gitremote`: the push remote over git's smart HTTP (auth, bodies).
- :mod:`.facade`: :class:`GitplugFacade`, what the web face needs of the
  extension; it is handed one and never imports the extension.

May import: the base (:mod:`gitplug.errors`, :mod:`gitplug.signals`,
:mod:`gitplug.prefixes`), :mod:`gitplug.config`, :mod:`gitplug.state`,
:mod:`gitplug.runtime`, :mod:`gitplug.deploy`. Nothing imports it but the
extension (and the CLI, for what it prints).
"""
