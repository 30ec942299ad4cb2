"""gitplug's benchmark: ``python -m bench [--quick] [--json]``.

Measures, in one run and against a baseline measured in the same run, what a
plugin route costs per request, how long a swap takes, how fast a webhook
goes live, what swapping does to throughput, how quickly every worker
converges, whether memory grows over reloads and how routing scales with
the number of plugins. ``bench/README.md`` explains every figure and the
JSON shape.

Modules: :mod:`bench.cli` (entry point, plans, metadata), :mod:`bench.figures`
(figures, spread, table), :mod:`bench.inprocess` (in-process figures),
:mod:`bench.live` (restart baseline, webhook), :mod:`bench.site` (the
gitplug server under test), :mod:`bench.underload` (throughput, convergence), :mod:`bench.server` (gunicorn
subprocesses, HTTP to 127.0.0.1), :mod:`bench.loadgen` (the load generator),
:mod:`bench.apps` (the WSGI apps gunicorn serves), :mod:`bench.fixtures`
(releases, plugins, git repositories), :mod:`bench.profiling` (where the
time goes, under cProfile).
"""

from __future__ import annotations

__all__: list[str] = []
