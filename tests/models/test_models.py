"""Models: MDEQ and the DEQ transformer LM, driven by deq_fast and by TorchDEQ (the reference)."""
from __future__ import annotations

import pytest
import torch

from deq_fast.models import MDEQ, MODEL_CONFIGS, DEQTransformerLM, build_model, get_config

torch.set_num_threads(1)

# Fixed-count plain iteration: both libraries run the same arithmetic, so outputs must agree.
FIXED = dict(f_solver="fixed_point_iter", f_max_iter=7, f_tol=1e-30, f_stop_mode="abs",
             b_solver="fixed_point_iter", b_max_iter=7, b_tol=1e-30)


def _small_mdeq(deq_impl, channels=(8, 8, 16), dropout=0.0, **deq):
    torch.manual_seed(0)
    return MDEQ(channels, head_channels=(4, 8, 8), final_channels=16, num_classes=5,
                in_channels=2, num_groups=4, expansion=2, dropout=dropout, num_unrolled=3,
                deq_kwargs={**FIXED, **deq}, deq_impl=deq_impl)


def test_named_configs_have_reference_sizes():
    tiny, large = get_config("mdeq-tiny"), get_config("mdeq-large")
    assert tiny["arch"]["channels"] == (24, 24) and tiny["arch"]["head_channels"] == (8, 16)
    assert tiny["arch"]["final_channels"] == 200 and tiny["arch"]["dropout"] == 0.25
    assert large["arch"]["channels"] == (32, 64, 128, 256)
    assert large["arch"]["final_channels"] == 1680 and large["arch"]["dropout"] == 0.3
    for cfg in (tiny, large):
        assert cfg["arch"]["expansion"] == 5 and cfg["arch"]["num_groups"] == 8
        assert cfg["train"]["f_solver"] == "broyden" and cfg["train"]["f_max_iter"] == 18
        assert cfg["train"]["b_max_iter"] == 20 and cfg["train"]["f_stop_mode"] == "rel"
    n = sum(p.numel() for p in build_model("mdeq-tiny").parameters())
    assert 100_000 < n < 200_000, n                      # paper: about 170K
    assert set(MODEL_CONFIGS) >= {"mdeq-digits", "mdeq-tiny", "mdeq-large", "deq-lm-small"}


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model 'mdeq-huge'"):
        get_config("mdeq-huge")
    with pytest.raises(ValueError, match="no option 'width'"):
        build_model("mdeq-tiny", arch_overrides={"width": 3})
    with pytest.raises(ValueError, match="head_channels"):
        MDEQ((8, 8), (8,), 16, 10)
    with pytest.raises(ValueError, match="n_heads"):
        DEQTransformerLM(10, d_model=30, n_heads=4)


@pytest.mark.parametrize("batch,hw", [(1, (7, 9)), (3, (8, 8))], ids=["B1-7x9", "B3-8x8"])
def test_mdeq_shapes_odd_sizes_and_solver_info(batch, hw):
    m = _small_mdeq("deq_fast", f_solver="anderson", f_max_iter=6, b_solver="anderson",
                    b_max_iter=10, b_tol=1e-4)
    x = torch.randn(batch, 2, *hw)
    logits, info = m(x)
    assert logits.shape == (batch, 5) and torch.isfinite(logits).all()
    assert info["nstep"].shape == (batch,)
    logits.sum().backward()
    assert all(p.grad is not None for p in m.cell.parameters() if p.requires_grad)
    assert m.stem[0].weight.grad.abs().sum() > 0          # gradient reaches the injection


def test_mdeq_large_runs():
    m = build_model("mdeq-large", deq_kwargs=dict(FIXED, f_max_iter=2))
    assert 8e6 < sum(p.numel() for p in m.parameters()) < 12e6
    m.eval()
    with torch.no_grad():
        logits, _ = m(torch.randn(1, 3, 16, 16))
    assert logits.shape == (1, 10)


def test_mdeq_deq_fast_matches_torchdeq():
    """Same weights, same fixed-count solver, 1-step phantom gradient: logits and parameter
    gradients agree. (At initialisation the MDEQ's backward fixed-point iteration does not
    contract, so the exact gradient is compared on contractive problems in the DEQ tests.)"""
    ours = _small_mdeq("deq_fast", ift=False, grad=1, grad_mode="phantom")
    ref = _small_mdeq("torchdeq", ift=False, grad=1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 7, 9)
    y = torch.tensor([0, 3, 4])
    outs = []
    for m in (ours, ref):
        logits, _ = m(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][name], rtol=2e-3, atol=2e-5, msg=name)
    # negative check: the gradient mode matters (exact, GMRES backward != phantom). A fixed-point
    # backward would not do: it diverges here, and its best iterate is then its first, grad
    # itself, which is exactly the 1-step phantom gradient.
    other = _small_mdeq("deq_fast", ift=True, b_solver="gmres")
    logits, _ = other(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    g0 = other.cell.blocks[0].conv1.weight_v.grad
    assert not torch.allclose(g0, outs[0][1]["cell.blocks.0.conv1.weight_v"], rtol=1e-3)


def test_mdeq_dropout_is_variational_and_off_in_eval():
    m = _small_mdeq("deq_fast", dropout=0.3)
    x = torch.randn(2, 2, 8, 8)
    a, _ = m(x)
    b, _ = m(x)
    assert not torch.allclose(a, b)                       # new mask per forward in training
    m.eval()
    with torch.no_grad():
        c, _ = m(x)
        d, _ = m(x)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    m0 = _small_mdeq("deq_fast", dropout=0.0)
    e, _ = m0(x)
    f, _ = m0(x)
    torch.testing.assert_close(e, f, rtol=1e-6, atol=1e-6)


def test_mdeq_unrolled_warmup_applies_f_num_unrolled_times():
    m = _small_mdeq("deq_fast")
    m.eval()
    x = torch.randn(2, 2, 7, 8)
    with torch.no_grad():
        warm, info = m(x, unrolled=True)
        assert info == {}
        inj = m.stem(x)
        zs = [torch.zeros(2, 8, 7, 8), torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 2, 2)]
        for _ in range(m.num_unrolled):
            zs = m.cell(zs, inj)
        torch.testing.assert_close(warm, m.head(zs), rtol=1e-5, atol=1e-6)
        zs = m.cell(zs, inj)                               # negative check: one more layer
        assert not torch.allclose(warm, m.head(zs), rtol=1e-3, atol=1e-4)


def _lm(deq_impl="deq_fast", **kw):
    torch.manual_seed(0)
    return DEQTransformerLM(50, d_model=24, n_heads=3, d_ff=40, max_len=16, dropout=0.0,
                            deq_kwargs={**dict(f_solver="simple_fixed_point_iter", f_max_iter=6),
                                        **kw}, deq_impl=deq_impl)


def test_lm_is_causal():
    m = _lm()
    m.eval()
    tokens = torch.randint(0, 50, (2, 11))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 50
    with torch.no_grad():
        a, _ = m(tokens)
        b, _ = m(changed)
    assert a.shape == (2, 11, 50)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])          # the change is seen from t = 6 on


def test_lm_deq_fast_matches_torchdeq_and_rejects_long_input():
    kw = dict(f_solver="fixed_point_iter", f_tol=1e-30, ift=False, grad=1)
    ours, ref = _lm(**kw, grad_mode="phantom"), _lm("torchdeq", **kw)
    ref.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 50, (3, 13))
    la, _ = ours(tokens)
    lb, _ = ref(tokens)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    la.square().mean().backward()
    lb.square().mean().backward()
    torch.testing.assert_close(ours.cell.qkv.weight_v.grad, ref.cell.qkv.weight_v.grad,
                               rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="L <= 16"):
        ours(torch.zeros(1, 17, dtype=torch.long))
