"""Side-by-side benchmark of kinema against diffusers; writes benchmarks/results/<name>.{json,md}.

    python benchmarks/harness.py                          # CPU: kinema-tiny and small-wan
    python benchmarks/harness.py --parts step_cache --configs kinema-tiny
    python benchmarks/harness.py --configs wan2.1-1.3b --device cuda --dtype bf16 --repeats 3

The same as ``kinema bench``; the measurements live in :mod:`kinema.bench`. On a busy machine
pass ``--threads 1``: small CPU kernels slow down badly when their threads are descheduled.
"""

from __future__ import annotations

import argparse
import sys

from kinema.bench import add_arguments, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except ValueError as err:
        print(f"harness: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
