"""The deploy part: the pipeline from a git ref to a live release.

fetch -> resolve -> stage -> test -> load -> verify -> swap -> record.

- :mod:`.gitsource`: dulwich mirrors, ls-remote, ref resolution (fetch, resolve).
- :mod:`.releases`: immutable release directories, tree validation, pruning (stage).
- :mod:`.testgate`: the plugin's own tests in a contained subprocess (test).
- :mod:`.pipeline`: :class:`Deployer`, the pipeline and its per-plugin lock;
  load, verify and swap through the runtime; the record in the state store.
- :mod:`.triggers`: the coalescing deploy queue and APScheduler polls.
- :mod:`.autorollback`: the error-rate watch of a newly live release.
- :mod:`.layout`: where things live under ``data_dir``; file locks.
- :mod:`.hosted`: the push remote: hosted repositories, git's protocol
  (dulwich's server side) and the pre-receive rules of a push.
- :mod:`.notify`: ``notify:`` messages, sent from a background thread.
- :mod:`.hostwatch`: a fleet's lost hosts, reported once per fleet (``host_lost``).
- :mod:`.peers`: in a fleet, a hosted repository fetched from the host a push reached.
- :mod:`.canary`: the judgement of a running canary (promote or roll back).
- :mod:`.credentials`: ``credentials:`` entries matched to repository URLs (HTTPS, SSH).
- :mod:`.signatures`: ``verify:``, the signed-commit check before staging.
- :mod:`.requirements`: a release's declared requirements checked before its tests.
- :mod:`.discovery`: ``discover:``, plugins found as directories of a repository.

It reports progress through :mod:`gitplug.signals` (``deploy_*``,
``stage_finished``, ``poll_succeeded``); whoever wants figures subscribes.

May import: the base (:mod:`gitplug.errors`, :mod:`gitplug.signals`,
:mod:`gitplug.prefixes`), :mod:`gitplug.config`, :mod:`gitplug.state`,
:mod:`gitplug.runtime`. Never the web face or the extension.
"""
