"""Isolated import of one release of a plugin package.

Each release is imported under a namespace of its own: the package ``hello``
of release ``3f2a...`` becomes the top-level module ``hello__gp7_3f2a9c1e``
(``__name__`` of every module carries it), so two releases of one package
live side by side in ``sys.modules`` without seeing each other.

Plugin code keeps writing ``from hello.views import x``: every module of the
release gets a ``__builtins__`` of its own whose ``__import__`` maps the
package's real name onto the release's namespace. Relative imports work
unchanged because ``__package__`` is the namespaced name.

Before a release may go live, every ``.py`` file of the package is compiled
(a syntax error anywhere fails the load with file and line) and every module
is imported, including those that ``__init__`` never imports. A failed load
leaves nothing behind in ``sys.modules``. :func:`purge_namespace` removes a
retired release's modules, loggers and caches so it can become garbage.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import linecache
import logging
import re
import sys
import threading
import traceback
import types
import typing as t
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EntryPointError, PluginImportError, PluginLoadError, PluginNameMismatch
from .codecache import CodeCache
from .manifest import verify_release
from .plugin import Plugin

__all__ = [
    "ReleaseNamespace",
    "import_release",
    "purge_namespace",
    "find_entry",
    "fault_location",
    "release_relative",
]

logger = logging.getLogger(__name__)

#: Suffixes of native extension modules; they cannot be unloaded, so refused.
_NATIVE_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES) + (".so", ".pyd", ".dylib")
#: Directories at the top of a release that are never the plugin package.
_NOT_PACKAGES = {"tests", "test", "docs", "doc", "build", "dist", "examples", "__pycache__"}

_sequence = itertools.count(1)
_registry_lock = threading.Lock()


class ReleaseSentinel:
    """Planted as ``__gitplug_release__`` in every module of a release.

    A function, class or frame of the release keeps its module's globals
    alive, and with them this object: a weak reference to it tells whether
    anything of an unloaded release is still reachable.
    """

    __slots__ = ("label", "release", "__weakref__")

    def __init__(self, label: str) -> None:
        self.label = label
        #: A weak reference to the release's ``LoadedRelease`` once it exists:
        #: how :data:`~gitplug.current_plugin` finds the plugin whose function
        #: is running (an app-wide filter or global called by the host).
        self.release: t.Any = None

    def __repr__(self) -> str:
        return f"<release {self.label}>"


@dataclass(eq=False)
class ReleaseNamespace:
    """The import namespace of one loaded release. Internal to gitplug."""

    #: The package's own name (``hello``).
    package: str
    #: The namespaced top-level module name (``hello__gp7_3f2a9c1e``).
    mangled: str
    #: The package directory inside the release.
    package_dir: Path
    #: The release directory (root of the checkout).
    release_dir: Path
    plugin_name: str
    release_id: str
    #: Code objects compiled in the check pass, reused by the loader.
    codes: dict[str, types.CodeType] = field(default_factory=dict, repr=False)
    builtins: dict[str, t.Any] = field(default_factory=dict, repr=False)
    #: Where compiled code is shared between processes (None: compile every time).
    code_cache: CodeCache | None = field(default=None, repr=False)
    #: A weak reference to the object every module of the release holds in
    #: its globals: alive exactly as long as any of the release's code is.
    sentinel_ref: weakref.ref[ReleaseSentinel] | None = field(default=None, repr=False)
    _sentinel: ReleaseSentinel | None = field(default=None, repr=False)

    def module_name(self, real_name: str) -> str:
        """Map ``hello.views`` to ``hello__gp7_....views``."""
        return self.mangled + real_name[len(self.package) :]

    def real_name(self, module_name: str) -> str:
        """Map a namespaced module name back to the name the author wrote."""
        if module_name == self.mangled or module_name.startswith(self.mangled + "."):
            return self.package + module_name[len(self.mangled) :]
        return module_name


class _ReleaseLoader(importlib.machinery.SourceFileLoader):
    """Executes a release module with the release's ``__builtins__``.

    Never writes ``__pycache__`` into a release (releases are immutable) and
    reuses the code compiled by the check pass.
    """

    def __init__(self, fullname: str, path: str, namespace: ReleaseNamespace) -> None:
        super().__init__(fullname, path)
        self.namespace = namespace

    def get_code(self, fullname: str) -> types.CodeType:
        code = self.namespace.codes.get(self.path)
        if code is not None:
            return code
        return t.cast(types.CodeType, super().get_code(fullname))

    def set_data(self, path: str, data: bytes, *, _mode: int = 0o666) -> None:
        return None  # no bytecode cache inside an immutable release

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__["__builtins__"] = self.namespace.builtins
        module.__dict__["__gitplug_release__"] = self.namespace._sentinel
        super().exec_module(module)


class _ReleaseFinder(importlib.abc.MetaPathFinder):
    """Finds modules of registered release namespaces, and only those."""

    def __init__(self) -> None:
        self.namespaces: dict[str, ReleaseNamespace] = {}

    def find_spec(
        self,
        fullname: str,
        path: t.Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        top, _, rest = fullname.partition(".")
        namespace = self.namespaces.get(top)
        if namespace is None:
            return None
        base = namespace.package_dir.joinpath(*rest.split(".")) if rest else namespace.package_dir
        init = base / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(
                fullname,
                init,
                loader=_ReleaseLoader(fullname, str(init), namespace),
                submodule_search_locations=[str(base)],
            )
        module_file = base.with_name(base.name + ".py")
        if module_file.is_file():
            return importlib.util.spec_from_file_location(
                fullname, module_file, loader=_ReleaseLoader(fullname, str(module_file), namespace)
            )
        return None

    def __repr__(self) -> str:
        return f"<gitplug release finder: {len(self.namespaces)} namespaces>"


_finder = _ReleaseFinder()


def _install_finder() -> None:
    with _registry_lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def _make_import(namespace: ReleaseNamespace) -> t.Callable[..., types.ModuleType]:
    """An ``__import__`` that maps the package's own name into the release."""
    real_import = builtins.__import__
    package = namespace.package
    prefix = package + "."
    mangled = namespace.mangled

    def release_import(
        name: str,
        globals: t.Mapping[str, t.Any] | None = None,
        locals: t.Mapping[str, t.Any] | None = None,
        fromlist: t.Sequence[str] | None = (),
        level: int = 0,
    ) -> types.ModuleType:
        if level == 0 and (name == package or name.startswith(prefix)):
            module = real_import(mangled + name[len(package) :], globals, locals, fromlist, 0)
            # `import hello.views` binds the top-level name, which is the
            # mangled module itself: real_import already returned it.
            return module
        return real_import(name, globals, locals, fromlist, level)

    return release_import


def find_package(release_dir: Path, entry: str | None, plugin_name: str) -> tuple[str, str]:
    """Return ``(package, "module.path:attr")`` for the release.

    Without ``entry``, the release must hold exactly one top-level package
    and the entry is its ``plugin`` attribute.
    """
    if entry:
        module_path, _, attr = entry.partition(":")
        package = module_path.split(".")[0]
        if not (release_dir / package / "__init__.py").is_file():
            raise EntryPointError(
                f"plugin {plugin_name!r}: entry {entry!r} names package {package!r}, but the"
                f" release has no {package}/__init__.py. Fix `entry` in the configuration"
                " or add the package to the repository.",
                plugin=plugin_name,
            )
        return package, f"{module_path}:{attr or 'plugin'}"
    candidates = sorted(
        p.name
        for p in release_dir.iterdir()
        if p.is_dir()
        and (p / "__init__.py").is_file()
        and p.name not in _NOT_PACKAGES
        and p.name.isidentifier()
    )
    if len(candidates) != 1:
        found = ", ".join(candidates) if candidates else "none"
        raise EntryPointError(
            f"plugin {plugin_name!r}: cannot tell which package to load from"
            f" {release_dir}: expected exactly one top-level package, found {found}."
            " Set `entry: package.module:attribute` for the plugin in the configuration.",
            plugin=plugin_name,
        )
    return candidates[0], f"{candidates[0]}:plugin"


#: Top-level modules every plugin imports (directly or through Flask).
_HOST_FOUNDATIONS = frozenset(
    {"gitplug", "flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous", "click", "blinker"}
)


def _refuse_shadowing(package: str, plugin_name: str) -> None:
    """A plugin package may not be named like the standard library or Flask.

    Inside the release, the package's own name means the package, so its
    ``import flask`` would import itself (a circular import) and the error
    would point nowhere useful. Other names are fine even if the host has a
    module of that name: the plugin's imports of it resolve to the release.
    """
    if package in _HOST_FOUNDATIONS or package in sys.stdlib_module_names:
        raise EntryPointError(
            f"plugin {plugin_name!r}: package {package!r} has the same name as a module the"
            " host application already uses, so the plugin could not import the real one."
            f" Rename the package (for example to {plugin_name}_plugin) and set `entry`.",
            plugin=plugin_name,
        )


def release_relative(path: str | Path, release_dir: Path) -> str:
    """``path`` relative to the release directory, for messages; as given if outside."""
    try:
        return str(Path(path).relative_to(release_dir))
    except ValueError:
        return str(path)


def _compile_package(namespace: ReleaseNamespace) -> list[str]:
    """Compile every module of the package; return their namespaced names."""
    modules: list[str] = []
    for path in sorted(namespace.package_dir.rglob("*")):
        rel = path.relative_to(namespace.package_dir)
        if "__pycache__" in rel.parts:
            continue
        if path.suffix in _NATIVE_SUFFIXES or path.name.endswith(_NATIVE_SUFFIXES):
            raise PluginImportError(
                f"plugin {namespace.plugin_name!r}: {release_relative(path, namespace.release_dir)} is a"
                " native extension module; native code cannot be unloaded, so gitplug refuses"
                " it. Install native dependencies in the host environment instead.",
                plugin=namespace.plugin_name,
                release=namespace.release_id,
                file=release_relative(path, namespace.release_dir),
            )
        if path.suffix != ".py" or not path.is_file():
            continue
        parts = rel.with_suffix("").parts
        if not all(p.isidentifier() for p in parts):
            continue  # not importable as a module (e.g. a data file named my-file.py)
        if any(
            not (namespace.package_dir.joinpath(*parts[:i]) / "__init__.py").is_file()
            for i in range(1, len(parts))
        ):
            continue  # inside a directory that is not a package
        source = path.read_bytes()
        try:
            if namespace.code_cache is not None:
                namespace.codes[str(path)] = namespace.code_cache.compile(source, str(path))
            else:
                namespace.codes[str(path)] = compile(source, str(path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            rel_file = release_relative(exc.filename or path, namespace.release_dir)
            raise PluginImportError(
                f"plugin {namespace.plugin_name!r}: syntax error in {rel_file} line"
                f" {exc.lineno}: {exc.msg}. Fix the file and deploy a new commit;"
                " the live release is unchanged.",
                plugin=namespace.plugin_name,
                release=namespace.release_id,
                file=rel_file,
                line=exc.lineno,
            ) from None
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join((namespace.mangled, *parts)))
    return modules


def fault_location(exc: BaseException, release_dir: Path) -> tuple[str | None, int | None]:
    """The innermost traceback frame inside the release, as (file, line)."""
    location: tuple[str | None, int | None] = (None, None)
    release = str(release_dir)
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(release):
            location = (release_relative(frame.filename, release_dir), frame.lineno)
    if isinstance(exc, SyntaxError) and exc.filename and exc.filename.startswith(release):
        location = (release_relative(exc.filename, release_dir), exc.lineno)
    return location


def import_release(
    release_dir: Path,
    *,
    plugin_name: str,
    release_id: str,
    entry: str | None,
    code_cache: CodeCache | None = None,
    verify: bool = False,
) -> tuple[ReleaseNamespace, Plugin]:
    """Import every module of a release under a fresh namespace.

    Returns the namespace and the entry :class:`Plugin`. On any error the
    namespace is purged and a :class:`PluginLoadError` subclass is raised.
    With ``verify``, a release that differs from its staging manifest is
    refused (:class:`~gitplug.errors.ReleaseModified`) before anything is
    imported.
    """
    release_dir = Path(release_dir).resolve()
    if verify:
        verify_release(release_dir, plugin=plugin_name, release_id=release_id)
    package, entry_spec = find_package(release_dir, entry, plugin_name)
    _refuse_shadowing(package, plugin_name)
    token = re.sub(r"[^0-9A-Za-z]", "", release_id)[:10] or "x"
    namespace = ReleaseNamespace(
        package=package,
        mangled=f"{package}__gp{next(_sequence)}_{token}",
        package_dir=release_dir / package,
        release_dir=release_dir,
        plugin_name=plugin_name,
        release_id=release_id,
        code_cache=code_cache,
    )
    sentinel = ReleaseSentinel(f"{plugin_name}@{release_id[:12]}")
    namespace._sentinel = sentinel
    namespace.sentinel_ref = weakref.ref(sentinel)
    del sentinel
    namespace.builtins = dict(builtins.__dict__)
    namespace.builtins["__import__"] = _make_import(namespace)
    _install_finder()
    with _registry_lock:
        _finder.namespaces[namespace.mangled] = namespace
    try:
        modules = _compile_package(namespace)
        for name in modules:
            _import_module(name, namespace)
        plugin = find_entry(namespace, entry_spec)
    except BaseException:
        purge_namespace(namespace)
        raise
    finally:
        # The code objects are only needed while importing; the modules hold
        # the sentinel from now on, the namespace only a weak reference.
        namespace.codes.clear()
        namespace._sentinel = None
    return namespace, plugin


def _import_module(name: str, namespace: ReleaseNamespace) -> None:
    try:
        importlib.import_module(name)
    except PluginLoadError:
        raise
    except BaseException as exc:  # noqa: BLE001 - import-time code may raise anything, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        file, line = fault_location(exc, namespace.release_dir)
        where = f" in {file} line {line}" if file else ""
        raise PluginImportError(
            f"plugin {namespace.plugin_name!r}: importing {namespace.real_name(name)} failed{where}:"
            f" {type(exc).__name__}: {str(exc).rstrip('.')}. Fix the code and deploy a new commit;"
            " the live release is unchanged.",
            plugin=namespace.plugin_name,
            release=namespace.release_id,
            file=file,
            line=line,
        ) from exc


def find_entry(namespace: ReleaseNamespace, entry_spec: str) -> Plugin:
    """Resolve ``module.path:attr`` inside the release to its :class:`Plugin`."""
    module_path, _, attr = entry_spec.partition(":")
    module = sys.modules.get(namespace.module_name(module_path))
    if module is None:
        raise EntryPointError(
            f"plugin {namespace.plugin_name!r}: entry module {module_path!r} does not exist in"
            f" the release. Fix `entry` ({entry_spec!r}) in the configuration.",
            plugin=namespace.plugin_name,
            release=namespace.release_id,
        )
    obj = getattr(module, attr, None)
    if obj is None:
        raise EntryPointError(
            f"plugin {namespace.plugin_name!r}: {module_path} has no attribute {attr!r}."
            f" Create it (`{attr} = Plugin({namespace.plugin_name!r}, __name__)`) or fix"
            " `entry` in the configuration.",
            plugin=namespace.plugin_name,
            release=namespace.release_id,
        )
    if not isinstance(obj, Plugin):
        raise EntryPointError(
            f"plugin {namespace.plugin_name!r}: {entry_spec} is a {type(obj).__name__}, not a"
            " gitplug.Plugin. Create it with `Plugin(name, __name__)`.",
            plugin=namespace.plugin_name,
            release=namespace.release_id,
        )
    if obj.name != namespace.plugin_name:
        # Served under another name, the release's own url_for("<its name>.x")
        # would build another plugin's URLs (a page linking another plugin's
        # or release's files): refused rather than half-renamed.
        raise PluginNameMismatch(
            f"plugin {namespace.plugin_name!r}: the release creates Plugin({obj.name!r}, ...)"
            f" but is configured as {namespace.plugin_name!r}. Name the plugin"
            f" {obj.name!r} in the configuration, or create it with"
            f" `Plugin({namespace.plugin_name!r}, __name__)`; the live release is unchanged.",
            plugin=namespace.plugin_name,
            declared=obj.name,
            release=namespace.release_id,
        )
    return obj


def purge_namespace(namespace: ReleaseNamespace) -> None:
    """Forget everything the interpreter keeps about a release's modules.

    After this, and once nothing else references them, the release's
    modules, functions and classes are garbage.
    """
    prefix = namespace.mangled + "."
    with _registry_lock:
        _finder.namespaces.pop(namespace.mangled, None)
    for name in [n for n in list(sys.modules) if n == namespace.mangled or n.startswith(prefix)]:
        sys.modules.pop(name, None)
    manager = logging.Logger.manager
    with _logging_lock():
        for name in [n for n in list(manager.loggerDict) if n == namespace.mangled or n.startswith(prefix)]:
            manager.loggerDict.pop(name, None)
        manager._clear_cache()  # type: ignore[attr-defined]
    release = str(namespace.release_dir)
    for filename in [f for f in list(linecache.cache) if f.startswith(release)]:
        linecache.cache.pop(filename, None)
    for key in [k for k in list(sys.path_importer_cache) if str(k).startswith(release)]:
        sys.path_importer_cache.pop(key, None)
    # typing caches (Generic[...] subscriptions, ...) hold classes strongly.
    for clear in getattr(t, "_cleanups", ()):
        clear()
    namespace.codes.clear()


def _logging_lock() -> t.ContextManager[t.Any]:
    lock = getattr(logging, "_lock", None)
    return lock if lock is not None else threading.Lock()
