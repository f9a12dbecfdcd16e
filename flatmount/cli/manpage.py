"""Bash completion and a man page, generated from the argparse parser so they never drift from it.

Both walk the same tree of parsers: the subcommands in data-flow order, their options and their
positional arguments with the help text they carry.  Written here rather than taken from shtab or
argparse-manpage: the parser is plain argparse (no custom actions to teach a library), the walk is
short, and the project keeps no run-time dependency for a build step.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Iterator


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each direct subcommand, in the order the help lists them."""
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in a._choices_actions}
            out += [(name, helps.get(name, ""), sp) for name, sp in a.choices.items()]
    return out


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for a in parser._actions:
        if a.option_strings and a.help != argparse.SUPPRESS:
            yield a


def _positionals(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for a in parser._actions:
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
            yield a


def _takes_value(a: argparse.Action) -> bool:
    return a.nargs != 0


# --- bash completion ------------------------------------------------------------------------------

def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script: subcommands (and `objects` reports), each one's options, and file
    names for values and positional arguments."""
    prog = parser.prog
    fn = "_" + prog.replace("-", "_")
    lines = [f"# bash completion for {prog}, generated from its argparse parser (flatmount.cli.manpage)",
             f"{fn}() {{",
             "    local cur prev words cword",
             "    cur=${COMP_WORDS[COMP_CWORD]}",
             "    prev=${COMP_WORDS[COMP_CWORD-1]}",
             "    local cmd='' sub='' i",
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             "        case ${COMP_WORDS[i]} in",
             "            -*) ;;",
             "            *) if [[ -z $cmd ]]; then cmd=${COMP_WORDS[i]}; elif [[ -z $sub ]]; then "
             "sub=${COMP_WORDS[i]}; fi ;;",
             "        esac",
             "    done",
             "    local opts words_",
             "    case $prev in"]
    valued = sorted({o for p in [parser] + [sp for _, _, sp in _subcommands(parser)]
                     for a in _options(p) if _takes_value(a) for o in a.option_strings})
    if valued:
        lines += [f"        {'|'.join(valued)})", "            COMPREPLY=($(compgen -f -- \"$cur\")); return ;;"]
    lines += ["    esac", "    case $cmd in"]
    top_opts = " ".join(o for a in _options(parser) for o in a.option_strings)
    names = " ".join(n for n, _, _ in _subcommands(parser))
    lines += ["        '')", f"            opts='{top_opts}'; words_='{names}' ;;"]
    for name, _, sp in _subcommands(parser):
        opts = " ".join(o for a in _options(sp) for o in a.option_strings)
        nested = _subcommands(sp)
        if nested:
            lines += [f"        {name})", "            case $sub in",
                      f"                '') opts='{opts}'; words_='{' '.join(n for n, _, _ in nested)}' ;;"]
            for sub_name, _, nsp in nested:
                nopts = " ".join(o for a in _options(nsp) for o in a.option_strings)
                lines.append(f"                {sub_name}) opts='{nopts}'; words_='' ;;")
            lines += ["            esac ;;"]
        else:
            lines += [f"        {name})", f"            opts='{opts}'; words_='' ;;"]
    lines += ["    esac",
              "    if [[ $cur == -* ]]; then",
              "        COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\"))",
              "    elif [[ -n $words_ ]]; then",
              "        COMPREPLY=($(compgen -W \"$words_\" -- \"$cur\"))",
              "    else",
              "        COMPREPLY=($(compgen -f -- \"$cur\"))",
              "    fi",
              "}",
              f"complete -o filenames -F {fn} {prog}",
              ""]
    return "\n".join(lines)


# --- man page -------------------------------------------------------------------------------------

def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no line starting with . or '."""
    text = " ".join(text.split()).replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _usage_of(a: argparse.Action) -> str:
    if a.option_strings:
        opt = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings)
        if _takes_value(a):
            opt += f" \\fI{_roff(a.metavar or a.dest.upper())}\\fR"
        return opt
    return f"\\fI{_roff(a.metavar or a.dest)}\\fR"


def man_page(parser: argparse.ArgumentParser, date: str | None = None) -> str:
    """flatmount(1) in man(7) roff: synopsis, description, global options, then every subcommand
    with its description, arguments and options, then exit status."""
    from flatmount import __version__
    prog = parser.prog
    date = date or datetime.date.today().isoformat()
    out = [f'.TH {prog.upper()} 1 "{date}" "{prog} {__version__}" "User Commands"',
           ".SH NAME", f"{prog} \\- {_roff(parser.description or '')}",
           ".SH SYNOPSIS", f".B {prog}", "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
           ".SH DESCRIPTION",
           _roff("Subcommands follow the data flow: import and image records, flatten and mount, diff, "
                 "maintenance, then the store-less building blocks. Store selection options and --json "
                 "may also be given before the subcommand name."),
           ".SH GLOBAL OPTIONS"]
    for a in _options(parser):
        out += [".TP", _usage_of(a), _roff(a.help or "")]
    out.append(".SH COMMANDS")
    for name, help_text, sp in _subcommands(parser):
        out += [f".SS {prog} {name}", _roff(sp.description or help_text)]
        for a in _positionals(sp):
            out += [".TP", _usage_of(a), _roff(a.help or "")]
        for a in _options(sp):
            if a.dest == "help":
                continue
            out += [".TP", _usage_of(a), _roff(a.help or "")]
        for nname, nhelp, nsp in _subcommands(sp):
            out += [".TP", f"\\fB{name} {nname}\\fR", _roff(nsp.description or nhelp)]
            for a in _positionals(nsp):
                out += [".RS", ".TP", _usage_of(a), _roff(a.help or ""), ".RE"]
    out += [".SH EXIT STATUS",
            _roff("0 success; 1 differences found (diff --exit-code) or errors left (fsck); 2 usage "
                  "error; 3 a flatmount error (one line on stderr, no traceback)."),
            ".SH SEE ALSO", "podman(1), mkcomposefs(1), mount.composefs(1)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python3 -m flatmount.cli.manpage OUTDIR`: write flatmount.1 and flatmount.bash there."""
    import os
    import sys

    from flatmount.cli import build_parser

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m flatmount.cli.manpage OUTDIR", file=sys.stderr)
        return 2
    os.makedirs(args[0], exist_ok=True)
    parser = build_parser()
    for fname, text in (("flatmount.1", man_page(parser)), ("flatmount.bash", bash_completion(parser))):
        with open(os.path.join(args[0], fname), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
