"""gflags-style command lines, as Caffe's tools accept them: ``-solver=x``, ``--solver=x``,
``-solver x`` and ``--solver x`` all mean the same; booleans take ``-flag``, ``-noflag`` or ``-flag=false``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RecaffeError


class FlagError(RecaffeError, ValueError):
    pass


@dataclass
class Flag:
    name: str
    default: object
    help: str
    kind: type = str


@dataclass
class FlagSet:
    flags: dict[str, Flag] = field(default_factory=dict)

    def add(self, name: str, default, help: str, kind: type | None = None) -> None:
        self.flags[name] = Flag(name, default, help, kind or type(default) if default is not None else str)

    def usage(self) -> str:
        return "\n".join(f"  -{f.name} ({f.help}) type: {f.kind.__name__} default: {f.default!r}"
                         for f in self.flags.values())

    def parse(self, argv: list[str]) -> tuple[dict[str, object], list[str]]:
        values = {name: f.default for name, f in self.flags.items()}
        positional: list[str] = []
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            if not arg.startswith("-") or arg in ("-", "--"):
                positional.append(arg)
                continue
            name, eq, value = arg.lstrip("-").partition("=")
            flag = self.flags.get(name)
            if flag is None and name.startswith("no") and name[2:] in self.flags \
                    and self.flags[name[2:]].kind is bool and not eq:
                values[name[2:]] = False
                continue
            if flag is None:
                known = ", ".join("-" + n for n in self.flags)
                raise FlagError(f"unknown command line flag '{name}' (known: {known})")
            if flag.kind is bool:
                if eq:
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise FlagError(f"flag -{name} takes true or false, got {value!r}")
                    values[name] = value.lower() in ("true", "1", "yes")
                else:
                    values[name] = True
                continue
            if not eq:
                if i >= len(argv):
                    raise FlagError(f"flag -{name} is missing its value")
                value = argv[i]
                i += 1
            try:
                values[name] = flag.kind(value)
            except ValueError:
                raise FlagError(f"flag -{name} takes a {flag.kind.__name__}, got {value!r}") from None
        return values, positional


HELP_FLAGS = ("h", "help", "helpfull", "helpshort")


def parse_tool_argv(tool: str, flags: FlagSet | None, argv: list[str], usage: str,
                    nargs: tuple[int, ...]) -> int | tuple[dict[str, object], list[str]]:
    """The command-line prelude shared by Caffe's tools.

    ``-help`` prints the usage and gives exit code 0; a bad flag, or a number of positional
    arguments not in ``nargs``, prints the problem and the usage on stderr and gives 1. Otherwise
    returns ``(flag values, positional arguments)``. (Caffe's tools print the usage and exit 0
    on a wrong command line; here it is an error.)
    """
    import sys

    full_usage = usage + (flags.usage() + "\n" if flags is not None and flags.flags else "")
    if any(a.lstrip("-") in HELP_FLAGS for a in argv if a.startswith("-")):
        print(full_usage, end="")
        return 0
    try:
        values, positional = flags.parse(argv) if flags is not None else ({}, list(argv))
    except FlagError as e:
        print(f"{tool}: ERROR: {e}\n\n{full_usage}", end="", file=sys.stderr)
        return 1
    if len(positional) not in nargs:
        want = " or ".join(str(n) for n in nargs)
        print(f"{tool}: expected {want} arguments, got {len(positional)}\n\n{full_usage}", end="",
              file=sys.stderr)
        return 1
    return values, positional
