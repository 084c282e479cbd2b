"""What the user typed on upstream's command line, read with argparse's public API only: which
options were typed (not defaults), a parse that neither prints nor exits, and a plugin's mode
name given to a ``--train-mode`` whose choices do not list it (a stock mlx-lm-lora's)."""

from __future__ import annotations

import argparse


def explicit_options(parser: argparse.ArgumentParser, argv) -> set:
    """Names of the options typed in ``argv``: every destination starts as a marker object in the
    namespace (argparse then sets no default), and what parsing changed was typed."""
    marker = object()
    ns = argparse.Namespace(**{k: marker for k in vars(parser.parse_args([]))})
    return {k for k, v in vars(parser.parse_args(argv, namespace=ns)).items() if v is not marker}


class _NotOurs(Exception):
    pass


def quiet(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` made to raise instead of printing help or an error and exiting (its public
    ``error``, ``exit`` and ``print_help`` methods replaced on this one object)."""

    def stop(*_a, **_k):
        raise _NotOurs

    parser.error = parser.exit = parser.print_help = stop
    return parser


def _quiet_parse(parser: argparse.ArgumentParser, argv):
    """``parser.parse_args(argv)``, or None where argparse would print (help, errors) and exit:
    upstream's own main then parses again and prints exactly what it always printed."""
    try:
        return quiet(parser).parse_args(argv)
    except _NotOurs:
        return None


def typed(parser: argparse.ArgumentParser, argv):
    """:func:`explicit_options` of ``argv``, or None where ``parser`` refuses it."""
    try:
        return explicit_options(quiet(parser), argv)
    except _NotOurs:
        return None


#: a --train-mode value every supported release accepts, parsed in place of a plugin's own name
PLACEHOLDER = "sft"


def parse_command_line(build_parser, argv, names):
    """``(namespace, argv as parsed)`` for the command line ``argv``, or None where upstream's own
    main should parse it (its help, its errors: a built-in mode's run prints what it always did).

    A mode name of ``names`` that upstream's ``--train-mode`` does not list is parsed as
    :data:`PLACEHOLDER` and set back afterwards: the token is taken for ``--train-mode``'s value
    only where parsing just that option and the placeholder gives ``train_mode`` alone. A plugin
    mode's command line is then parsed aloud: argparse prints its help or error and exits."""
    argv, name = list(argv), None
    for i, token in enumerate(argv):
        option, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if not eq and i:
            option = argv[i - 1]
        if value in names and option.startswith("-"):
            probe = [f"{option}={PLACEHOLDER}"] if eq else [option, PLACEHOLDER]
            if typed(build_parser(), probe) == {"train_mode"}:
                argv[i], name = (probe[0] if eq else PLACEHOLDER), value
    if name is None:
        ns = _quiet_parse(build_parser(), argv)
    else:
        ns = build_parser().parse_args(argv)
        if ns.train_mode == PLACEHOLDER:
            ns.train_mode = name
    return None if ns is None else (ns, argv)
