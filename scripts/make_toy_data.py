"""Regenerate a shipped generated problem set, byte for byte.

    python scripts/make_toy_data.py [--set toy|wordproblems] [--out DIR] [--seed N] [--train N] [--test N]

toy: data/toy/ (tests/unit/test_toydata.py checks it); wordproblems: data/wordproblems/, the
default run's task (opsd/assets/wordproblems.py). With the defaults the output is identical to the files
in the repository.
"""

from __future__ import annotations

import argparse
import sys

from opsd.assets import toydata, wordproblems

SETS = {
    "toy": (toydata.DEFAULT_TOY_DIR, toydata.DEFAULT_SEED, toydata.DEFAULT_SIZES, toydata.write_toy_data),
    "wordproblems": (wordproblems.DEFAULT_DIR, wordproblems.DEFAULT_SEED, wordproblems.DEFAULT_SIZES,
                     wordproblems.write_word_data),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="toy", help="which problem set")
    ap.add_argument("--out", help="output directory (default: the set's folder under data/)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--train", type=int, help="train rows")
    ap.add_argument("--test", type=int, help="test rows")
    args = ap.parse_args(argv)
    out, seed, sizes, write = SETS[args.set]
    sizes = {"train": args.train or sizes["train"], "test": args.test or sizes["test"]}
    paths = write(args.out or str(out), sizes, seed if args.seed is None else args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
