"""``vlmrun``: run, chat with, inspect and check models.

vlmrun --model DIR [--prompt TEXT]      one-shot generation, or an interactive chat
vlmrun serve --model DIR                OpenAI-compatible HTTP server on 127.0.0.1:8000
vlmrun bench --model DIR | --url URL    throughput, TTFT, inter-token latency under load
vlmrun demo                             the bundled demo model answers questions about pictures
vlmrun plugins [--json]                 installed plugins (does not import torch)
vlmrun which --model DIR                which plugin serves a model, and who else claimed it
vlmrun check --model DIR                validate config and weights without running
vlmrun quantize --model DIR --scheme w4a16 -o OUT   write a quantized (compressed-tensors) copy
vlmrun export --model DIR --part vision --format onnx -o OUT   export a model part (ONNX)
vlmrun install / uninstall PACKAGE      pip, in the interpreter that runs vlmrun
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vlm import __version__
from vlm.errors import VlmError

COMMANDS = ("run", "serve", "bench", "demo", "plugins", "which", "check", "quantize", "export", "install", "uninstall")


def _add_plugin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin-file",
        action="append",
        default=[],
        metavar="PATH",
        help="load hookimpls from a plain .py file (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, help="model directory, or a hub id in the local HF cache")
    parser.add_argument("--plugin", help="use this plugin instead of the one `match` picks")
    parser.add_argument("--allow-download", action="store_true", help="download a hub id that is not cached")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmrun", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"vlm-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="generate once (--prompt) or chat interactively (default command)")
    _add_model_options(run)
    _add_plugin_options(run)
    from vlm.cli.run import add_run_arguments

    add_run_arguments(run)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (127.0.0.1:8000)")
    _add_model_options(serve)
    _add_plugin_options(serve)
    from vlm.cli.serve import add_serve_arguments

    add_serve_arguments(serve)

    bench = sub.add_parser("bench", help="throughput, TTFT and inter-token latency under concurrent load")
    _add_plugin_options(bench)
    from vlm.cli.bench import add_bench_arguments

    add_bench_arguments(bench)

    demo = sub.add_parser("demo", help="the bundled demo model answers questions about the bundled pictures")
    _add_plugin_options(demo)
    from vlm.cli.demo import add_demo_arguments

    add_demo_arguments(demo)

    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.add_argument(
        "--components", action="store_true", help="list every component registry entry (towers, projectors, ...)"
    )
    plugins.add_argument("--rewriters", action="store_true", help="list every rewriter: target, backend, owner")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    _add_plugin_options(plugins)

    which = sub.add_parser("which", help="explain which plugin serves a model")
    _add_model_options(which)
    _add_plugin_options(which)

    check = sub.add_parser("check", help="validate a model's config and weights without running it")
    _add_model_options(check)
    _add_plugin_options(check)
    check.add_argument("--json", action="store_true", help="machine-readable report")

    quantize = sub.add_parser("quantize", help="write a quantized copy of a model (compressed-tensors W4A16 / W8A16)")
    _add_model_options(quantize)
    _add_plugin_options(quantize)
    from vlm.cli.quantize import add_quantize_arguments

    add_quantize_arguments(quantize)

    export = sub.add_parser("export", help="export a part of a model (the vision tower) to ONNX")
    _add_model_options(export)
    _add_plugin_options(export)
    from vlm.cli.export import add_export_arguments

    add_export_arguments(export)

    for name, verb in (("install", "install"), ("uninstall", "remove")):
        pip = sub.add_parser(name, help=f"{verb} plugins with pip in vlmrun's own environment")
        pip.add_argument("packages", nargs=argparse.REMAINDER, help="e.g. vlm-plugin-internvl, or -e ./my-plugin")
        pip.add_argument("--plugin-file", action="append", default=[], help=argparse.SUPPRESS)
        pip.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    return parser


def pip_command(command: str, packages: list[str]) -> int:
    """pip in *this* interpreter, so plugins land where vlmrun looks (venvs, pipx). Never loads
    plugins, so ``VLM_LOAD_PLUGINS='' vlmrun uninstall broken-plugin`` works even when one breaks start-up."""
    import subprocess

    extra = ["-y"] if command == "uninstall" else []
    return subprocess.call([sys.executable, "-m", "pip", command, *extra, *packages])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")  # `vlmrun --model X` is `vlmrun run --model X`
    if not argv:
        argv = ["--help"]
    if argv[0] in ("install", "uninstall") and len(argv) > 1 and argv[1] not in ("-h", "--help"):
        # everything after the command is pip's (argparse cannot pass through "-e PATH")
        return pip_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        from vlm.plugin.manager import add_plugin_file

        for path in args.plugin_file:
            add_plugin_file(path)
        if args.command == "plugins":
            from vlm.cli.inspect import plugins_command

            return plugins_command(args)
        if args.command == "which":
            from vlm.cli.inspect import which_command

            return which_command(args)
        if args.command in ("install", "uninstall"):
            if not args.packages:
                raise VlmError(f"name what to {args.command}, e.g. vlmrun {args.command} vlm-plugin-internvl")
            return pip_command(args.command, args.packages)
        if args.command == "bench":
            from vlm.cli.bench import bench_command

            return bench_command(args)
        if args.command == "demo":
            from vlm.cli.demo import demo_command

            return demo_command(args)
        if args.command == "check":
            from vlm.cli.check import check_command

            return check_command(args)
        if args.command == "quantize":
            from vlm.cli.quantize import quantize_command

            return quantize_command(args)
        if args.command == "export":
            from vlm.cli.export import export_command

            return export_command(args)
        if args.command == "serve":
            from vlm.cli.serve import serve_command

            return serve_command(args)
        from vlm.cli.run import run_command

        return run_command(args)
    except VlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): exit quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
