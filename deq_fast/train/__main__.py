"""``python -m deq_fast.train [options]``: the same as ``deq-fast train``."""
import sys

from deq_fast.train.cli import train_main

sys.exit(train_main())
