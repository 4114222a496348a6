"""Regenerate the shipped toy math set, data/toy/{train,test}.jsonl, byte for byte.

    python scripts/make_toy_data.py [--out DIR] [--seed N] [--train N] [--test N]

With the defaults the output is identical to the files in the repository
(tests/unit/test_toydata.py checks it).
"""

from __future__ import annotations

import argparse
import sys

from opsd.toydata import DEFAULT_SEED, DEFAULT_SIZES, DEFAULT_TOY_DIR, write_toy_data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_TOY_DIR), help="output directory")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--train", type=int, default=DEFAULT_SIZES["train"], help="train rows")
    ap.add_argument("--test", type=int, default=DEFAULT_SIZES["test"], help="test rows")
    args = ap.parse_args(argv)
    paths = write_toy_data(args.out, {"train": args.train, "test": args.test}, args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
