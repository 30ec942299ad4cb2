"""The ``gitplug`` command line, also mounted as ``flask gitplug``.

Every command reads the same configuration and state store as the server
(``-c FILE``, else ``$GITPLUG_CONFIG``, else, under ``flask gitplug``, the
application's own gitplug configuration, else ``./deploy.yaml``), so a
``gitplug rollback`` run beside a live server is served by it within two
seconds: the server watches the store. Domain errors become one line on
stderr and an exit code (1 for a failed deploy, 2 for bad input); never a
traceback.

Library code logs; the one-shot commands show gitplug's log records of
level ERROR and above on stderr (``-v``: warnings too, ``-vv``: info), since
what a deploy logs as a warning is already in its progress lines and its
result. ``serve`` and ``demo`` configure their own logging.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import typing as t
from pathlib import Path

import click

from .config import CONFIG_ENV_VAR, GitplugConfig, load_config, resolve_config_path
from .errors import BadInput, ConfigError, GitplugError
from .state import DeployRecord, DeployResult, StateStore, open_state_store

__all__ = ["main", "cli", "flask_group"]

F = t.TypeVar("F", bound=t.Callable[..., t.Any])

#: Commands that set up logging themselves (a server logs at INFO).
_OWN_LOGGING = frozenset({"serve", "demo"})


def _fail(exc: GitplugError) -> t.NoReturn:
    click.secho(f"Error: {exc}", fg="red", err=True)
    sys.exit(exc.exit_code)


def domain_errors(func: F) -> F:
    """Turn gitplug's errors into a message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return func(*args, **kwargs)
        except GitplugError as exc:
            _fail(exc)

    return t.cast(F, wrapper)


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Configuration file (default: $GITPLUG_CONFIG, else ./deploy.yaml).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _load(config_path: Path | None, *, need_secrets: bool = True) -> GitplugConfig:
    """The configuration, with the plugins the server discovered (README, "Discovery").

    ``need_secrets=False`` for read-only commands: they use neither the admin
    token nor the webhook secret, so an unset ``${NAME}`` for them does not
    fail them (the server's does).
    """
    from .deploy.discovery import with_discovered

    return with_discovered(_load_file(config_path, need_secrets=need_secrets))[0]


def _load_file(config_path: Path | None, *, need_secrets: bool = True) -> GitplugConfig:
    if config_path is None and not os.environ.get(CONFIG_ENV_VAR):
        from_app = _flask_app_config()
        if from_app is not None:
            return from_app
    return load_config(resolve_config_path(str(config_path) if config_path else None),
                       need_secrets=need_secrets)


def _flask_app_config() -> GitplugConfig | None:
    """Under ``flask gitplug``: the configuration of the app's GitPlug, if it has one.

    None outside ``flask``, and when no app is found without ``--app`` (then
    ``./deploy.yaml`` is read, as by ``gitplug``).
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    from flask.cli import NoAppException, ScriptInfo

    info = ctx.find_object(ScriptInfo)
    if info is None:
        return None
    try:
        app = info.load_app()
    except NoAppException as exc:
        if info.app_import_path:
            raise BadInput(
                f"could not load the Flask app {info.app_import_path!r}: {exc} Pass -c FILE to"
                " read a configuration file instead."
            ) from exc
        return None
    state = app.extensions.get("gitplug")
    if state is not None and state.config is not None:
        return t.cast(GitplugConfig, state.config)
    from .extension import _config_from_app

    return _config_from_app(app)


def _store(config: GitplugConfig) -> StateStore:
    return open_state_store(config.state, base_dir=config.base_dir)


#: Seconds a command waits at exit for its notifications (the deploy is done by then).
NOTIFY_GRACE_S = 15.0


def _deployer(config: GitplugConfig) -> t.Any:
    from .deploy.pipeline import Deployer

    deployer = Deployer(config, _store(config))
    if config.notify:
        # This process decides the deploy, so it sends its events; the
        # sender is a background thread, given a bounded wait at exit.
        from .deploy.notify import Notifier

        notifier = Notifier(lambda: deployer.config, sender=deployer).connect()
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.call_on_close(lambda: notifier.close(timeout=NOTIFY_GRACE_S))
    return deployer


def _print_json(data: t.Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def _progress(stage: str, message: str) -> None:
    colour = {"failed": "red", "live": "green", "skipped": "yellow"}.get(stage)
    if stage == "failed":
        # "STAGE: error and log tail": the result line prints the error (and
        # tail) once; here only the stage it failed at.
        message = message.partition(":")[0]
    click.secho(f"  {stage:<8} {message}", fg=colour, err=True)


def _report(record: DeployRecord | None, as_json: bool) -> None:
    if record is None:
        if as_json:
            _print_json(None)
        else:
            click.echo("nothing to do")
        return
    if as_json:
        _print_json(record.to_json())
    elif record.result == DeployResult.FAILED:
        click.secho(
            f"deploy {record.id} of {record.plugin} failed at {record.stage.value if record.stage else '?'}: {record.error}",
            fg="red",
            err=True,
        )
    elif record.result == DeployResult.RUNNING and record.stage is not None and record.stage.value == "canary":
        figures = record.canary_figures or {}
        click.echo(
            f"deploy {record.id} of {record.plugin}: canary ({_short(record.commit)} serves"
            f" {figures.get('percent', 0):g}% of the clients); it is promoted or rolled back by itself,"
            f" or now by `gitplug promote {record.plugin}` / `gitplug abort {record.plugin}`"
        )
    else:
        click.echo(f"deploy {record.id} of {record.plugin}: {record.result.value} ({_short(record.commit)})")
    if record.result == DeployResult.FAILED:
        sys.exit(1)


def _figures_line(figures: dict[str, t.Any] | None) -> str:
    """``canary 10%: 4 errors / 40 requests; live: 0 / 360`` of a deploy's canary figures."""
    if not figures:
        return ""
    canary, stable = figures.get("canary") or {}, figures.get("stable") or {}
    return (
        f"canary {figures.get('percent', 0):g}%: {canary.get('errors', 0)} errors / {canary.get('requests', 0)}"
        f" requests; live {_short(stable.get('commit'))}: {stable.get('errors', 0)} / {stable.get('requests', 0)}"
    )


def _configure_logging(verbose: int) -> None:
    """Show gitplug's log records on stderr; quiet unless asked (see the module doc).

    Leaves logging alone when something (a host app under ``flask gitplug``,
    a test runner) already configured it, so records are never shown twice.
    """
    logger = logging.getLogger("gitplug")
    if logging.getLogger().handlers or logger.handlers:
        return
    level = (logging.ERROR, logging.WARNING, logging.INFO)[min(verbose, 2)]
    handler = logging.StreamHandler()  # stderr, looked up at emit time
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.getEffectiveLevel()))


verbose_option = click.option(
    "-v", "--verbose", count=True, help="Also show gitplug's warnings (-v) and progress logs (-vv)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gitplug", prog_name="gitplug")
@verbose_option
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Deploy Flask plugins from git and hot-swap them in a running server."""
    if ctx.invoked_subcommand not in _OWN_LOGGING:
        _configure_logging(verbose)


@cli.command("check-config")
@config_option
@domain_errors
def check_config(config_path: Path | None) -> None:
    """Validate the configuration and say what is wrong, where."""
    from .deploy.gitsource import redact_url

    config = _load_file(config_path, need_secrets=False)
    found = f", {len(config.discover)} discover entr{'y' if len(config.discover) == 1 else 'ies'}"
    click.echo(f"{config.source}: OK, {len(config.plugins)} plugin(s){found if config.discover else ''}")
    for plugin in config.plugins.values():
        gate = " ".join(plugin.test) if plugin.test else "off"
        where = f" path {plugin.path}" if plugin.path else ""
        prefix = plugin.url_prefix or f"/{plugin.name} (unless its Plugin(...) declares a url_prefix)"
        click.echo(f"  {plugin.name}: {redact_url(plugin.repo)}{where} @ {plugin.ref} -> {prefix} (tests: {gate})")
        if plugin.verify is not None:
            keys = ([f"allowed_signers {plugin.verify.allowed_signers}"] if plugin.verify.allowed_signers else []) + [
                f"gpg key {key}" for key in plugin.verify.gpg_keys
            ]
            click.echo(f"    signed {'commits' if plugin.verify.mode == 'head' else 'tags'} only: {', '.join(keys)}")
    for entry in config.discover:
        click.echo(f"  discover {entry.path} in {redact_url(entry.repo)} @ {entry.ref} -> {entry.url_prefix}")
    source = Path(config.source) if config.source else None
    if source is not None and source.is_file():
        # Valid as read here; say what the server would still refuse (an unset secret).
        try:
            load_config(source)
        except ConfigError as exc:
            click.secho(f"note: `gitplug serve` would refuse it here: {exc}", fg="yellow", err=True)


@cli.command()
@config_option
@json_option
@domain_errors
def status(config_path: Path | None, as_json: bool) -> None:
    """Every plugin: tracked ref, pin, live commit per host and worker, last deploy."""
    from .status import build_status

    config = _load(config_path, need_secrets=False)
    data = build_status(config, _store(config))
    if as_json:
        _print_json(data)
        return
    for p in data["plugins"]:
        pin = f" (pinned at {p['pin']})" if p["pin"] else ""
        if p.get("discovered_from"):
            pin += f" (discovered in {p['discovered_from']['repo']} {p['discovered_from']['path']})"
        click.echo(f"{p['name']}: {p['state']}  {_short(p['live_commit'])}  ref {p['ref']}{pin}  {p['url_prefix']}")
        if p.get("state_reason"):
            click.echo(f"    {p['state']}: {p['state_reason']}")
        for host_id, host in sorted(p["hosts"].items()):
            lead = " (leader)" if host.get("leader") else ""
            error = f"  {host['error'].splitlines()[0]}" if host["error"] else ""
            click.echo(
                f"    host {host_id}{lead}: {host['state']}  {_short(host['live_commit'])}"
                f"  beat {host['heartbeat_at']}{error}"
            )
        canary = p.get("canary")
        if canary:
            click.echo(
                f"    canary {_short(canary['commit'])} serves {canary['percent']:g}% beside"
                f" {_short(canary['stable_commit'])} (deploy #{canary['deploy_id']}):"
                f" {canary['canary']['errors']} errors / {canary['canary']['requests']} requests;"
                f" live {canary['stable']['errors']} / {canary['stable']['requests']}"
            )
        for worker, commit in sorted(p["workers"].items()):
            click.echo(f"    worker {worker}: {_short(commit)}")
        last = p["last_deploy"]
        if last:
            stage = f" at {last['stage']}" if last["stage"] else ""
            click.echo(f"    last deploy #{last['id']} ({last['trigger']}): {last['result']}{stage}  {last['started_at']}")
            if last["error"] and last["result"] == "failed":
                click.echo(f"      {last['error'].splitlines()[0]}")
        if p["last_error"] and (not last or last["error"] != p["last_error"]):
            click.echo(f"    error: {p['last_error'].splitlines()[0]}")


@cli.command()
@click.argument("plugin")
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many deploys to show.",
)
@config_option
@json_option
@domain_errors
def history(plugin: str, limit: int, config_path: Path | None, as_json: bool) -> None:
    """Deploys of PLUGIN: when, trigger, ref, commit, result, stage, duration."""
    config = _load(config_path, need_secrets=False)
    if plugin not in config.removed:
        config.plugin(plugin)
    records = _store(config).history(plugin, limit=limit)
    if as_json:
        _print_json([r.to_json() for r in records])
        return
    click.echo(f"{'id':>5}  {'started':<26} {'trigger':<13} {'ref':<12} {'commit':<12} {'result':<11} {'stage':<12} duration")
    for r in records:
        duration = f"{r.duration_s:.2f}s" if r.duration_s is not None else "-"
        # A background failure that recurred counts on its first record.
        repeats = f"  (failed {r.repeats} times, last {r.last_seen_at})" if r.repeats > 1 else ""
        signed = f"  signed by {r.signer}" if r.signer else ""
        click.echo(
            f"{r.id:>5}  {r.started_at:<26} {r.trigger:<13} {(r.ref or '-')[:12]:<12} {_short(r.commit):<12}"
            f" {r.result.value:<11} {(r.stage.value if r.stage else '-'):<12} {duration}{repeats}{signed}"
        )
        figures = r.canary_figures
        if figures:
            click.echo(f"{'':>7}{_figures_line(figures)}")
            if figures.get("decision"):
                click.echo(f"{'':>7}{figures['decision']}")


@cli.command()
@click.argument("plugin")
@click.option("--ref", default=None, help="Deploy this ref instead of the tracked one.")
@config_option
@json_option
@domain_errors
def deploy(plugin: str, ref: str | None, config_path: Path | None, as_json: bool) -> None:
    """Deploy PLUGIN now and wait for the result (exit 1 on failure)."""
    deployer = _deployer(_load(config_path))
    deployer.plugin_config(plugin)  # an unknown name fails before "deploying ..."
    if not as_json:
        click.echo(f"deploying {plugin}{f' at {ref}' if ref else ''} ...", err=True)
    _report(deployer.deploy(plugin, ref=ref, trigger="cli", progress=None if as_json else _progress), as_json)


@cli.command()
@click.argument("plugin")
@click.argument("ref")
@config_option
@json_option
@domain_errors
def rollback(plugin: str, ref: str, config_path: Path | None, as_json: bool) -> None:
    """Pin PLUGIN at REF (a tag, sha, branch or `previous`) and deploy it."""
    deployer = _deployer(_load(config_path))
    deployer.plugin_config(plugin)
    if not as_json:
        click.echo(
            f"rolling {plugin} back to {ref} (pinned until `gitplug resume {plugin}`) ...", err=True
        )
    _report(deployer.rollback(plugin, ref, progress=None if as_json else _progress), as_json)


@cli.command()
@click.argument("plugin")
@config_option
@json_option
@domain_errors
def resume(plugin: str, config_path: Path | None, as_json: bool) -> None:
    """Unpin PLUGIN and deploy its tracked ref."""
    deployer = _deployer(_load(config_path))
    deployer.plugin_config(plugin)
    if not as_json:
        click.echo(f"resuming {plugin}: unpinned, deploying its tracked ref ...", err=True)
    _report(deployer.resume(plugin, progress=None if as_json else _progress), as_json)


@cli.command()
@click.argument("plugin")
@config_option
@json_option
@domain_errors
def promote(plugin: str, config_path: Path | None, as_json: bool) -> None:
    """End PLUGIN's canary: its release serves every client now."""
    record = _deployer(_load(config_path)).promote(plugin, trigger="cli")
    if as_json:
        _print_json(record.to_json())
        return
    click.echo(f"{plugin}: canary {_short(record.commit)} promoted (deploy {record.id} is live)")
    line = _figures_line(record.canary_figures)
    if line:
        click.echo(f"  {line}")


@cli.command()
@click.argument("plugin")
@config_option
@json_option
@domain_errors
def abort(plugin: str, config_path: Path | None, as_json: bool) -> None:
    """Roll PLUGIN's canary back: the live release serves every client again."""
    record = _deployer(_load(config_path)).abort(plugin, trigger="cli")
    if as_json:
        _print_json(record.to_json())
        return
    click.echo(f"{plugin}: canary {_short(record.commit)} rolled back (deploy {record.id} failed at canary)")
    line = _figures_line(record.canary_figures)
    if line:
        click.echo(f"  {line}")


@cli.command()
@click.argument("plugin")
@config_option
@domain_errors
def stop(plugin: str, config_path: Path | None) -> None:
    """Stop serving PLUGIN (its URLs answer 404) on every worker."""
    _deployer(_load(config_path)).stop(plugin)
    click.echo(f"{plugin}: stopped")


@cli.command()
@click.argument("plugin")
@config_option
@domain_errors
def start(plugin: str, config_path: Path | None) -> None:
    """Serve PLUGIN again on the release it had."""
    _deployer(_load(config_path)).start(plugin)
    click.echo(f"{plugin}: started")


@cli.command()
@click.argument("plugin")
@click.option("--deploy", "deploy_id", type=int, default=None, help="A deploy id (default: the latest with a log).")
@click.option("--full", is_flag=True, help="The whole log, with every traceback frame.")
@config_option
@domain_errors
def logs(plugin: str, deploy_id: int | None, full: bool, config_path: Path | None) -> None:
    """Print the test gate's output of a deploy of PLUGIN.

    Tracebacks are shortened to the plugin's own frames and a report
    repeated by several tests is shown once; --full prints the log as written.
    """
    config = _load(config_path, need_secrets=False)
    config.plugin(plugin)
    store = _store(config)
    if deploy_id is not None:
        record = store.get_deploy(deploy_id)
        if record is None or record.plugin != plugin:
            raise BadInput(
                f"no deploy {deploy_id} of plugin {plugin!r}; see `gitplug history {plugin}`."
            )
    else:
        record = next((r for r in store.history(plugin, limit=200) if r.log_path), None)
        if record is None:
            raise GitplugError(f"no deploy of {plugin!r} has a test log yet; run `gitplug deploy {plugin}`.")
    if not record.log_path or not Path(record.log_path).is_file():
        raise GitplugError(f"deploy {record.id} of {plugin!r} has no test log (the gate did not run).")
    text = Path(record.log_path).read_text(errors="replace")
    if not full:
        from .deploy.testgate import trim_test_log

        text = trim_test_log(text)
    click.echo(text, nl=False)


@cli.command("reload-config")
@config_option
@domain_errors
def reload_config(config_path: Path | None) -> None:
    """Validate the configuration and make running servers apply it."""
    config = _load(config_path)
    source = Path(config.source) if config.source else None
    if source is None or not source.is_file():
        raise BadInput(
            f"the configuration comes from {config.source or 'the application'}, not a file;"
            " restart the server to apply a change, or pass -c FILE."
        )
    os.utime(source)  # servers watch the file's mtime
    click.echo(
        f"{source}: OK, {len(config.plugins)} plugin(s); running servers apply it within ~2 s"
    )


def _parse_dev(values: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` pairs; a bare ``PATH`` (a directory of plugins) has the name ``""``."""
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if not Path(value).is_dir():
                raise click.BadParameter(f"{value!r}: expected NAME=PATH, or a directory of plugins;"
                                         " e.g. --dev hello=./plugins_repo_example or --dev ./plugins")
            pairs.append(("", Path(value)))
            continue
        if not name or not path:
            raise click.BadParameter(f"{value!r}: expected NAME=PATH, e.g. --dev hello=./plugins_repo_example")
        pairs.append((name, Path(path)))
    return pairs


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--dev", "dev", multiple=True, metavar="NAME=PATH|DIR",
              help="Serve a plugin from a directory (or every plugin in DIR's subdirectories); swap on every save.")
@config_option
@domain_errors
def serve(host: str, port: int, dev: tuple[str, ...], config_path: Path | None) -> None:
    """Run the server (a bare host application serving the plugins)."""
    from .serve import run_server

    dev_pairs = _parse_dev(dev)
    path = resolve_config_path(str(config_path) if config_path else None)
    config = load_config(path) if (config_path or not dev_pairs or path.exists()) else None
    run_server(config, host=host, port=port, dev=dev_pairs)


@cli.command()
@click.option("--port", default=5000, show_default=True, type=int)
@config_option
@domain_errors
def demo(port: int, config_path: Path | None) -> None:
    """The README's walkthrough, end to end, on this machine alone."""
    from .demo import run_demo

    run_demo(port=port, config_path=config_path)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="gitplug")


#: ``flask gitplug ...`` (registered as a ``flask.commands`` entry point).
flask_group = click.Group(
    "gitplug",
    help=cli.help,
    commands=dict(cli.commands),
    params=list(cli.params),  # --version and -v
    callback=cli.callback,  # the same logging setup
)
