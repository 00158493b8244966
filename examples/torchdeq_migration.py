"""A TorchDEQ-style model moved to deq_fast: change the imports, keep the code.

TorchDEQ models build the DEQ module with ``get_deq(...)``, normalise the equilibrium layer with
``apply_norm``/``reset_norm`` and reset variational dropout masks each step. deq_fast exports the
same names with the same contracts::

    # from torchdeq import get_deq
    # from torchdeq.norm import apply_norm, reset_norm
    # from torchdeq.dropout import VariationalDropout1d, reset_dropout
    from deq_fast import get_deq, apply_norm, reset_norm, VariationalDropout1d, reset_dropout

Differences worth knowing (see docs/contracts.md#torchdeq-deq-module): misspelt options raise
instead of being ignored,
and ``ift=True`` gives the exact implicit gradient (TorchDEQ's default is a 1-step phantom
gradient; deq_fast's DEQ defaults to the exact one). This script trains the model on the
scikit-learn digits for a few epochs (a few seconds on a CPU), printing each epoch's test accuracy
and solver statistics, then shows the first difference: a misspelt option is refused by name.

Run:  python examples/torchdeq_migration.py [--smoke]   (--smoke: 1 epoch on 320 digits, for tests)
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from deq_fast import VariationalDropout1d, apply_norm, get_deq, reset_dropout, reset_norm


class DEQClassifier(nn.Module):
    """Rows of an 8x8 digit as 8 tokens; the state is (B, 8, d)."""

    def __init__(self, d_in: int = 8, d: int = 64, n_classes: int = 10):
        super().__init__()
        self.inject = nn.Linear(d_in, d)
        self.cell = nn.Linear(d, d, bias=False)
        nn.init.normal_(self.cell.weight, std=0.3 / d ** 0.5)     # start contractive
        self.drop = VariationalDropout1d(0.05, token_first=True)
        self.head = nn.Linear(8 * d, n_classes)
        apply_norm(self.cell, "weight_norm")
        self.deq = get_deq(f_solver="anderson", f_max_iter=15, f_tol=1e-4,
                           b_solver="anderson", b_max_iter=15, b_tol=1e-4, ift=True)

    def forward(self, x: torch.Tensor):
        reset_norm(self.cell)                   # weights recomputed once per step
        reset_dropout(self)                     # new masks for this batch
        u = self.inject(x)

        def f(z):
            return torch.tanh(self.drop(self.cell(z)) + u)

        z_out, info = self.deq(f, torch.zeros_like(u))
        return self.head(z_out[-1].flatten(1)), info


def main(argv: list[str] | None = None) -> None:
    from sklearn.datasets import load_digits
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="1 epoch on 320 digits (for tests)")
    smoke = p.parse_args(argv).smoke
    # Early in training the backward solve often stops at its cap; deq_fast warns each time.
    warnings.filterwarnings("ignore", message="DEQ backward solve")
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0          # (N, 8, 8)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y))
    tr, te = perm[:320 if smoke else 1400], perm[1400:]
    model = DEQClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(1 if smoke else 3):
        model.train()
        for idx in tr[torch.randperm(len(tr))].split(64):
            logits, info = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits, info = model(x[te])
        acc = (logits.argmax(-1) == y[te]).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test acc {100 * acc:.1f}%  "
              f"solver steps {info['nstep'].mean():.1f}  residual {info['abs_lowest'].mean():.1e}")
    try:
        get_deq(f_solver="anderson", f_max_iters=15)       # TorchDEQ would ignore the typo
    except TypeError as exc:
        print(f"a misspelt option is refused: {exc}")
    print("shown: a TorchDEQ-style model (get_deq, apply_norm/reset_norm, variational dropout) "
          "trains with only its imports changed, with the exact implicit gradient (ift=True)")


if __name__ == "__main__":
    main()
