"""``vlmrun plugins`` and ``vlmrun which``: what is installed, and who serves a model."""

from __future__ import annotations

import json
import sys
from argparse import Namespace

from vlm.plugin.manager import PluginInfo, get_registry


def plugins_command(args: Namespace) -> int:
    """List plugins (or, with ``--components``, every registry entry); imports plugin modules but never torch."""
    infos = get_registry().describe()
    if getattr(args, "components", False):
        return components_command(args)
    if getattr(args, "rewriters", False):
        return rewriters_command(args, infos)
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print("no plugins installed (pip install vlm-plugin-<family>, or check VLM_LOAD_PLUGINS)")
        return 0
    for info in infos:
        origin = f"{info.distribution} {info.version}" if info.distribution else info.location
        print(f"{info.name}  [{info.source}: {origin}]")
        if info.error:
            print(f"  FAILED: {info.error}")
            continue
        print(f"  architectures: {', '.join(info.architectures) or '(not declared)'}")
        print(f"  hooks: {', '.join(info.hooks)}")
        if info.api_version:
            print(f"  plugin API: {info.api_version}")
    broken = [info.name for info in infos if info.error]
    if broken:
        print(
            f"{len(broken)} plugin(s) failed to load: {', '.join(broken)} (see FAILED above); "
            "VLM_LOAD_PLUGINS='' vlmrun uninstall <package> removes one",
            file=sys.stderr,
        )
    return 0


def components_command(args: Namespace) -> int:
    """Every component registry, every entry, its scope and where it lives (lazy entries stay unimported)."""
    from vlm.registry import describe

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    widths = [max(len(row[key]) for row in rows) for key in ("registry", "scope", "name")]
    for row in rows:
        registry, scope, name = (row[key].ljust(width) for key, width in zip(("registry", "scope", "name"), widths))
        print(f"{registry}  {scope}  {name}  {row['location']}")
    return 0


def rewriters_command(args: Namespace, infos: list[PluginInfo]) -> int:
    """Every rewriter (vlm.rewrite) the loaded plugins registered: kind, target, backend, priority,
    owner (the registering module, and the plugin it belongs to) and location; imports no torch."""
    import vlm.export  # noqa: F401  (the core's own rewriters: the ONNX export's, registered lazily)
    from vlm.rewrite import describe_rewriters

    modules = {_plugin_module(info): info.name for info in infos if info.error is None}

    def plugin_of(owner: str) -> str | None:
        return next(
            (name for module, name in modules.items() if owner == module or owner.startswith(module + ".")), None
        )

    rows = [{**row, "plugin": plugin_of(row["owner"])} for row in describe_rewriters()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        kinds = "FUNCTION_REWRITER, MODULE_REWRITER, SYMBOLIC_REWRITER"
        print(f"no rewriters registered (plugins register them with vlm.rewrite's {kinds})")
        return 0
    columns = ("kind", "target", "backend", "priority")
    widths = [max(len(str(row[key])) for row in rows) for key in columns]
    for row in rows:
        cells = "  ".join(str(row[key]).ljust(width) for key, width in zip(columns, widths))
        plugin = f" (plugin {row['plugin']})" if row["plugin"] else ""
        print(f"{cells}  owner {row['owner']}{plugin}  {row['location']}")
    return 0


def _plugin_module(info: PluginInfo) -> str:
    """The module a plugin's hooks live in (a plugin file is imported under its own name)."""
    if info.source == "file":  # the module name vlm.plugin.manager gives a plugin file
        return f"vlm_plugin_file_{info.name}"
    return info.location.partition(":")[0]


def which_command(args: Namespace) -> int:
    from vlm.config import load_model_config
    from vlm.loader import resolve_model_path

    model_dir = resolve_model_path(args.model, args.allow_download)
    config = load_model_config(model_dir)
    registry = get_registry()
    claims = registry.candidates(config.hf_config)
    print(f"model: {model_dir}")
    print(f"  architectures: {', '.join(config.architectures) or '-'}; model_type: {config.model_type or '-'}")
    try:
        chosen, _ = registry.choose(config.hf_config, args.plugin)
    except Exception:
        _print_claims(claims, None)
        raise
    how = "forced with --plugin" if args.plugin else "highest-priority claim"
    print(f"plugin: {chosen} ({how})")
    _print_claims(claims, chosen)
    for info in registry.broken():
        print(f"  (not asked, failed to load) {info.name}: {info.error}", file=sys.stderr)
    return 0


def _print_claims(claims, chosen: str | None) -> None:
    if not claims:
        print("claims: none")
        return
    print("claims:")
    for candidate in claims:
        mark = "*" if candidate.plugin == chosen else " "
        reason = f": {candidate.claim.reason}" if candidate.claim.reason else ""
        print(f" {mark} {candidate.plugin} (priority {candidate.claim.priority}){reason}")
