#!/usr/bin/env sh
# The README's main job: an MDEQ on the handwritten digits that ship with scikit-learn.
# No download; a few minutes on a 2-core CPU. Writes metrics.jsonl, checkpoint.pt, curves.png and
# residuals.png to runs/mdeq-digits-<timestamp> (or --out DIR), then evaluates that run.
# Needs the training extra (scikit-learn for the digits, matplotlib for the plots):
#   pip install "deq_fast[train]"      (".[train,test]" of the README's quick start includes it)
# Usage: sh examples/mdeq_digits.sh [deq-fast train options, e.g. --epochs 3 --out DIR]
#   (the test suite runs it at smoke size: --epochs 1 --batch_size 256 ...)
set -e
out="runs/mdeq-digits-$(date +%Y%m%d-%H%M%S)"
prev=""
for arg in "$@"; do                                    # the run's directory: --out DIR if given
  [ "$prev" = "--out" ] && out="$arg"
  case "$arg" in --out=*) out="${arg#--out=}" ;; esac
  prev="$arg"
done
echo "training an MDEQ on the scikit-learn digits into $out"
case " $* " in
  *" --out "*|*" --out="*) deq-fast train "$@" ;;
  *) deq-fast train "$@" --out "$out" ;;
esac
echo "evaluating the run just trained ($out) on the digits' test split:"
deq-fast eval --ckpt "$out"                            # the run just trained, not the newest
echo "shown: deq-fast train wrote $out (metrics.jsonl, checkpoint.pt, curves.png, residuals.png);"
echo "       deq-fast eval of its checkpoint reproduces the last epoch's test accuracy"
# Two processes (DistributedDataParallel, gloo on CPU):
#   torchrun --nproc_per_node=2 -m deq_fast.train --out runs/ddp
# Interrupted? Continue exactly where the last checkpoint stopped:
#   deq-fast train --resume runs/ddp
# The DEQ language model on CPython's documentation text:
#   deq-fast train --model deq-lm-small
