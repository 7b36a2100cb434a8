"""The ``localrefine`` command line: one module per subcommand.

Each module in :data:`COMMANDS` exposes ``add_args(parser)`` and
``main(args) -> int``; its docstring's first line is the ``--help`` summary and
the rest is the epilog (example usage).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["COMMANDS", "build_parser", "entry_point"]

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS: list[str] = [
    "refine",
    "mask",
    "reconstruct",
    "evaluate",
    "simulate",
    "subtract",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="localrefine",
        description="Local refinement of masked regions in cryo-EM maps.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debugging detail"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        summary, _, epilog = (module.__doc__ or name).strip().partition("\n")
        p = sub.add_parser(
            name.replace("_", "-"),
            help=summary,
            description=summary,
            epilog=epilog.strip() or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def entry_point(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code.

    An :class:`~localrefine_plugin.engine.errors.InputError` is printed as one
    line (file, problem, fix) with exit code 2, not as a traceback.
    """
    from ..engine.errors import InputError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return int(args._main(args) or 0)
    except InputError as exc:
        print(f"localrefine {args.command}: error: {exc}", file=sys.stderr)
        return 2
