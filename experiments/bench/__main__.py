"""``python -m experiments.bench [OPTIONS]``: the same as ``python -m experiments bench``."""

import argparse
import sys

from .command import DEFAULTS, add_arguments, run_from_args

parser = argparse.ArgumentParser(prog="python -m experiments.bench")
add_arguments(parser)
parser.set_defaults(**DEFAULTS)
sys.exit(run_from_args(parser.parse_args()))
