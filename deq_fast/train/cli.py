"""The ``deq-fast`` console script: ``deq-fast train [options]`` and ``deq-fast eval --ckpt ...``.

``deq-fast`` with no sub-command runs ``train`` with its defaults (the MDEQ on the embedded digits).
"""
from __future__ import annotations

import sys

__all__ = ["main"]

_USAGE = """usage: deq-fast {train,eval} [options]

  train   train a DEQ model (no options: MDEQ on the embedded digits); see deq-fast train --help
  eval    evaluate a checkpoint on its test split: deq-fast eval --ckpt RUN_DIR_OR_FILE
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to :func:`deq_fast.train.loop.main` or :func:`deq_fast.train.loop.eval_main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_USAGE)
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "train"
    from deq_fast.train import loop
    if command == "train":
        return loop.main(argv)
    if command == "eval":
        return loop.eval_main(argv)
    print(f"deq-fast: unknown command {command!r}\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
