"""The ``l2t-fast`` command. Each subcommand is a module of ``l2t_fast.jobs`` with
``add_arguments(parser)`` and ``main(args) -> exit status``; ``transfer``'s options are the
rows of the option table (``l2t_fast.jobs.options``), which also checks configs and types
sweeps, so the command line and the Python API cannot drift apart."""
import argparse
import importlib
import sys

from l2t_fast.host_memory import retain_freed_memory

COMMANDS = {
    "transfer": ("l2t_fast.jobs.transfer", "compare transfer methods on a few-label target task"),
    "sweep": ("l2t_fast.jobs.sweep", "hyperparameter sweep of the transfer job (Ray Tune)"),
    "analyze": ("l2t_fast.jobs.analyze", "what was transferred: CKA, basins, criticality..."),
    "pretrain": ("l2t_fast.jobs.pretrain", "train a source network for --source-checkpoint"),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="l2t-fast", description="Learning What and Where to Transfer (L2T-ww), fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = commands.add_parser(name, help=summary)
        module.add_arguments(command)
        command.set_defaults(handler=module.main)
    return parser


def main(argv=None):
    """Entry point of ``l2t-fast`` and ``python -m l2t_fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    retain_freed_memory()  # this process is ours: no page faults of each step's tensors
    try:
        return args.handler(args) or 0
    except ValueError as error:
        parser.exit(2, f"l2t-fast {args.command}: error: {error}\n")
