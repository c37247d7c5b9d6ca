"""`replayllm` command line: parsing, dispatch, and the one-line error contract.

User errors (bad file, bad parameter, prompt too long) print `error: <message>` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ReplayLLMError
from . import bench, generate, inspect, profile, synth

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="replayllm", description="Run GGUF language models; one CUDA-graph replay per token.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    generate.add_commands(sub)
    inspect.add_commands(sub)
    synth.add_commands(sub)
    bench.add_commands(sub)
    profile.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ReplayLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `replayllm generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
