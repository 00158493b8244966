"""``python -m deq_fast.train [options]``: the same as ``deq-fast train``."""
import sys

from deq_fast.train.loop import main

sys.exit(main())
