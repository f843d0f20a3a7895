"""IUPO loss against hand-computed values and an independent Eq. 4-7; ReferenceKeeper; the random reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from img.aligner import AlignerConfig, ImplicitAligner
from img.errors import UserError
from img.objective import ReferenceKeeper, copy_into_reference, iupo_loss, make_reference, sq_dist


def _t(*rows):  # (B, N=1, D=2)
    return torch.tensor([[r] for r in rows], dtype=torch.float32)


def _sp(x):
    return math.log1p(math.exp(x))


# Two samples, one token of two channels each. With distance="mean", d is the mean over the 2 channels;
# with "sum" (the default, ||.||_2^2) every d below is twice as large.
PRED = _t([1.0, 0.0], [0.0, 2.0])
REF = _t([0.0, 0.0], [1.0, 1.0])
WIN = _t([2.0, 0.0], [0.0, 0.0])
LOSE = _t([0.0, 2.0], [2.0, 2.0])
# sample 0: d(w,f)=(1+0)/2=0.5  d(w,ref)=(4+0)/2=2   d(l,f)=(1+4)/2=2.5  d(l,ref)=(0+4)/2=2  d(ref,f)=(1+0)/2=0.5
# sample 1: d(w,f)=(0+4)/2=2    d(w,ref)=(1+1)/2=1   d(l,f)=(4+0)/2=2    d(l,ref)=(1+1)/2=1  d(ref,f)=(1+1)/2=1
Z_DPO = [(0.5 - 2) - (2.5 - 2), (2 - 1) - (2 - 1)]  # [-2.0, 0.0]
Z_SPIN = [(0.5 - 2) - 0.5, (2 - 1) - 1]  # [-2.0, 0.0]
Z_FULL = [2 * (0.5 - 2) - (2.5 - 2) - 0.5, 2 * (2 - 1) - (2 - 1) - 1]  # [-4.0, 0.0]


def test_sq_dist_sum_is_default_and_mean_divides_by_n_times_d():
    assert torch.allclose(sq_dist(WIN, PRED), torch.tensor([1.0, 4.0]))
    assert torch.allclose(sq_dist(WIN, PRED, "sum"), torch.tensor([1.0, 4.0]))
    assert torch.allclose(sq_dist(WIN, PRED, "mean"), torch.tensor([0.5, 2.0]))
    a, b = torch.zeros(3, 4, 5), torch.full((3, 4, 5), 2.0)
    assert torch.equal(sq_dist(a, b), torch.full((3,), 80.0)) and torch.equal(sq_dist(a, b, "mean"), torch.full((3,), 4.0))
    with pytest.raises(UserError, match="distance='l1'"):
        sq_dist(a, b, "l1")


def test_full_objective_hand_computed_sum():
    # every d doubles: z doubles too, so the softplus is not a rescaled copy of the mean's
    loss, parts = iupo_loss(PRED, REF, WIN, LOSE)
    z = [2 * v for v in Z_FULL]  # [-8.0, 0.0]
    assert math.isclose(parts["loss_base"].item(), 2.5, rel_tol=1e-6)
    assert math.isclose(parts["loss_pref"].item(), (_sp(z[0]) + _sp(z[1])) / 2, rel_tol=1e-6)
    assert math.isclose(parts["z"].item(), -4.0) and math.isclose(parts["d_win"].item(), 2.5)
    assert math.isclose(parts["d_win_ref"].item(), 3.0) and math.isclose(parts["d_ref"].item(), 1.5)


def test_full_objective_hand_computed():
    loss, parts = iupo_loss(PRED, REF, WIN, LOSE, lam=1.0, terms="full", distance="mean")
    base = (0.5 + 2.0) / 2
    pref = (_sp(Z_FULL[0]) + _sp(Z_FULL[1])) / 2
    assert Z_FULL == [-4.0, 0.0]
    assert math.isclose(parts["loss_base"].item(), base, rel_tol=1e-6)
    assert math.isclose(parts["loss_pref"].item(), pref, rel_tol=1e-6)
    assert math.isclose(loss.item(), base + pref, rel_tol=1e-6)
    assert math.isclose(parts["d_win"].item(), 1.25) and math.isclose(parts["d_win_ref"].item(), 1.5)
    assert math.isclose(parts["d_lose"].item(), 2.25) and math.isclose(parts["d_lose_ref"].item(), 1.5)
    assert math.isclose(parts["d_ref"].item(), 0.75)
    assert math.isclose(parts["win_vs_ref"].item(), 0.5)
    loss2, _ = iupo_loss(PRED, REF, WIN, LOSE, lam=0.5, distance="mean")
    assert math.isclose(loss2.item(), base + 0.5 * pref, rel_tol=1e-6)


@pytest.mark.parametrize("terms,z", [("dpo", Z_DPO), ("spin", Z_SPIN)])
def test_ablation_terms_hand_computed(terms, z):
    _, parts = iupo_loss(PRED, REF, WIN, LOSE, terms=terms, distance="mean")
    assert math.isclose(parts["loss_pref"].item(), (_sp(z[0]) + _sp(z[1])) / 2, rel_tol=1e-6)


def _eq4_to_7(pred, ref, win, lose, lam, per_element):
    """Independent float64 Eq. 4, 6 and 7, sample by sample, with l(x) = log(1 + e^-x)."""
    def norm2(a, b):  # ||a - b||_2^2
        v = float(np.sum((a - b) ** 2))
        return v / a.size if per_element else v

    base, pref = [], []
    for f, r, w, l in zip(pred, ref, win, lose):
        base.append(norm2(w, f))  # Eq. 4
        inner = 2 * (norm2(w, f) - norm2(w, r)) - (norm2(l, f) - norm2(l, r)) - norm2(r, f)
        x = -inner  # Eq. 6: l(-[...])
        pref.append(math.log1p(math.exp(-x)) if -x < 30 else -x + math.log1p(math.exp(x)))
    return float(np.mean(base)) + lam * float(np.mean(pref))  # Eq. 7


@pytest.mark.parametrize("distance", ["sum", "mean"])
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0, 5.0])
def test_iupo_equals_an_independent_eq4_to_7(distance, lam):
    rng = np.random.default_rng(3)
    for scale in (0.05, 0.3, 1.0):  # z from near 0 (softplus ~ linear) to large (hinge-like)
        w = rng.standard_normal((6, 4, 8))
        lose, f, r = (w + scale * rng.standard_normal(w.shape) for _ in range(3))
        t = [torch.tensor(x, dtype=torch.float32) for x in (f, r, w, lose)]
        loss, _ = iupo_loss(*t, lam=lam, terms="full", distance=distance)
        want = _eq4_to_7(*(x.numpy().astype(np.float64) for x in t), lam=lam, per_element=distance == "mean")
        assert math.isclose(loss.item(), want, rel_tol=1e-5), (distance, lam, scale, loss.item(), want)
    assert iupo_loss(*t, lam=lam)[0].item() == iupo_loss(*t, lam=lam, distance="sum")[0].item()  # sum is the default


def test_full_is_dpo_plus_spin_and_base_is_lam_zero():
    torch.manual_seed(0)
    p, r, w, l = (torch.randn(4, 3, 5) for _ in range(4))
    _, full = iupo_loss(p, r, w, l, terms="full")
    _, dpo = iupo_loss(p, r, w, l, terms="dpo")
    _, spin = iupo_loss(p, r, w, l, terms="spin")
    assert torch.allclose(full["z"], dpo["z"] + spin["z"], atol=1e-6)
    base, parts = iupo_loss(p, r, w, l, terms="base")
    lam0, _ = iupo_loss(p, r, w, l, lam=0.0)
    assert torch.allclose(base, lam0) and parts["loss_pref"].item() == 0.0
    with pytest.raises(UserError, match="terms="):
        iupo_loss(p, r, w, l, terms="ipo")


def test_gradient_flows_only_into_pred():
    torch.manual_seed(0)
    p = torch.randn(2, 3, 4, requires_grad=True)
    r = torch.randn(2, 3, 4, requires_grad=True)
    loss, _ = iupo_loss(p, r, torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    loss.backward()
    assert p.grad is not None and r.grad is None


def test_softplus_is_stable_for_large_z():
    p = torch.zeros(1, 1, 1)
    w, l, r = torch.full((1, 1, 1), 100.0), torch.zeros(1, 1, 1), torch.full((1, 1, 1), 100.0)
    # d(w,f)=1e4, d(w,ref)=0, d(l,f)=0, d(l,ref)=1e4, d(ref,f)=1e4 -> z = 2*1e4 + 1e4 - 1e4 = 2e4
    loss, parts = iupo_loss(p, r, w, l)
    assert math.isfinite(loss.item()) and math.isclose(parts["loss_pref"].item(), 2e4, rel_tol=1e-6)


def test_reference_keeper_semantics():
    k = ReferenceKeeper(k=3)
    # win, win, tie (not a win: resets), win, win, win -> copy on the 6th
    seq = [(1, 2), (1, 2), (2, 2), (1, 2), (1, 2), (0.5, 2)]
    assert [k.observe(a, b) for a, b in seq] == [False] * 5 + [True]
    assert k.streak == 0 and k.copies == 1  # reset after the copy
    # a loss resets the streak
    assert [k.observe(a, b) for a, b in [(1, 2), (1, 2), (3, 2), (1, 2), (1, 2)]] == [False] * 5
    assert k.streak == 2
    assert k.observe(torch.tensor(1.0), torch.tensor(2.0)) is True
    state = k.state_dict()
    k2 = ReferenceKeeper(k=10)
    k2.load_state_dict(state)
    assert k2.state_dict() == {"k": 3, "streak": 0, "copies": 2}
    with pytest.raises(UserError):
        ReferenceKeeper(k=0)


def test_k_equals_one_copies_on_every_strict_win():
    k = ReferenceKeeper(k=1)
    assert [k.observe(a, b) for a, b in [(1, 2), (2, 2), (1, 2)]] == [True, False, True]


def test_random_reference_is_not_identity_and_is_frozen():
    cfg = AlignerConfig(dim=16, depth=1, dim_head=4, heads=2, guidance_dim=8, output_dim=16)
    state = torch.random.get_rng_state()
    ref = make_reference(cfg, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training
    h, c = torch.randn(2, 3, 8), torch.randn(2, 4, 16)
    with torch.no_grad():
        assert not torch.allclose(ref(h, c), c)
        assert torch.equal(make_reference(cfg, seed=1, init="identity")(h, c), c)
        assert torch.equal(make_reference(cfg, seed=1)(h, c), ref(h, c))  # seeded
    model = ImplicitAligner(cfg)
    copy_into_reference(model, ref)
    with torch.no_grad():
        assert torch.equal(ref(h, c), c)  # now a copy of the (identity) model
    assert all(not p.requires_grad for p in ref.parameters())
