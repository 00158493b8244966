#!/usr/bin/env sh
# The README's main job: an MDEQ on the handwritten digits that ship with scikit-learn.
# No download; a few minutes on a 2-core CPU. Writes metrics.jsonl, checkpoint.pt, curves.png and
# residuals.png to runs/mdeq-digits-<timestamp> (or --out DIR).
# Needs the training extra (scikit-learn for the digits, matplotlib for the plots):
#   pip install "deq_fast[train]"      (".[test]" of the README's quick start includes it)
set -e
deq-fast train "$@"                                   # = python -m deq_fast.train "$@"
# Evaluate the checkpoint of the newest run:
deq-fast eval --ckpt "$(ls -td runs/mdeq-digits-* | head -1)"
# Two processes (DistributedDataParallel, gloo on CPU):
#   torchrun --nproc_per_node=2 -m deq_fast.train --out runs/ddp
# Interrupted? Continue exactly where the last checkpoint stopped:
#   deq-fast train --resume runs/ddp
# The DEQ language model on CPython's documentation text:
#   deq-fast train --model deq-lm-small
