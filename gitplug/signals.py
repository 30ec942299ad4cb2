"""Blinker signals, in the style of Flask's own (``flask.signals``).

Each is sent with the :class:`~gitplug.GitPlug`-managed Flask app as sender
(``current_app._get_current_object()`` style) and keyword arguments::

    plugin_loaded       plugin=<name>, release=<release id>, commit=<sha|None>
    plugin_unloaded     plugin, release, commit
    plugin_load_failed  plugin, release, error=<PluginLoadError>
    deploy_started      plugin, deploy=<DeployRecord>
    deploy_succeeded    plugin, deploy
    deploy_failed       plugin, deploy, error
    rolled_back         plugin, deploy, from_commit, to_commit, reason
    canary_started      plugin, deploy, commit, stable_commit, percent
    canary_promoted     plugin, deploy, commit, stable_commit, figures=<dict>, reason
    canary_aborted      plugin, deploy, commit, stable_commit, figures, reason
    stage_finished      plugin, stage=<fetch|stage|test|load|swap>, seconds=<float>
    poll_succeeded      plugin, at=<unix time>
    host_lost           host=<host id>, info=<HostInfo>, reported_by=<host id>

``stage_finished`` and ``poll_succeeded`` are sent by the deployer with itself
as sender; the metrics of :mod:`gitplug.web.metrics` subscribe to them, so
the pipeline never imports the HTTP face.

``host_lost`` (a fleet's, README "Running a fleet") is sent by a host's
controller, with its deployer as sender, when it sees another host whose
heartbeat is older than :data:`~gitplug.state.HOST_LOST_AFTER_S`: ``host``
is the silent host's id, ``info`` its last :class:`~gitplug.state.HostInfo`
(``heartbeat_at``, and per plugin the commit it served and whether it led
it), ``reported_by`` the sending host's id. Once per fleet per loss: of all
the fleet's controllers exactly one sends it (:mod:`gitplug.deploy.hostwatch`);
a host that beats again and goes silent again is a new loss.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = [
    "plugin_loaded",
    "plugin_unloaded",
    "plugin_load_failed",
    "deploy_started",
    "deploy_succeeded",
    "deploy_failed",
    "rolled_back",
    "canary_started",
    "canary_promoted",
    "canary_aborted",
    "stage_finished",
    "poll_succeeded",
    "host_lost",
]

_signals = Namespace()

plugin_loaded = _signals.signal("gitplug-plugin-loaded")
plugin_unloaded = _signals.signal("gitplug-plugin-unloaded")
plugin_load_failed = _signals.signal("gitplug-plugin-load-failed")
deploy_started = _signals.signal("gitplug-deploy-started")
deploy_succeeded = _signals.signal("gitplug-deploy-succeeded")
deploy_failed = _signals.signal("gitplug-deploy-failed")
rolled_back = _signals.signal("gitplug-rolled-back")
canary_started = _signals.signal("gitplug-canary-started")
canary_promoted = _signals.signal("gitplug-canary-promoted")
canary_aborted = _signals.signal("gitplug-canary-aborted")
stage_finished = _signals.signal("gitplug-stage-finished")
poll_succeeded = _signals.signal("gitplug-poll-succeeded")
host_lost = _signals.signal("gitplug-host-lost")
