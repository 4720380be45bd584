"""`python -m sigattn.bench`: the benchmark sweep without the sigattn CLI."""

import argparse
import sys

from sigattn.bench.run import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sigattn.bench", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
