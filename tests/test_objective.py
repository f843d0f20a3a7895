"""IUPO loss against hand-computed values; ReferenceKeeper semantics; the random reference."""
from __future__ import annotations

import math

import pytest
import torch

from img.aligner import AlignerConfig, ImplicitAligner
from img.errors import UserError
from img.objective import ReferenceKeeper, copy_into_reference, iupo_loss, make_reference, sq_dist


def _t(*rows):  # (B, N=1, D=2)
    return torch.tensor([[r] for r in rows], dtype=torch.float32)


def _sp(x):
    return math.log1p(math.exp(x))


# Two samples, one token of two channels each. d is the mean over the 2 channels.
PRED = _t([1.0, 0.0], [0.0, 2.0])
REF = _t([0.0, 0.0], [1.0, 1.0])
WIN = _t([2.0, 0.0], [0.0, 0.0])
LOSE = _t([0.0, 2.0], [2.0, 2.0])
# sample 0: d(w,f)=(1+0)/2=0.5  d(w,ref)=(4+0)/2=2   d(l,f)=(1+4)/2=2.5  d(l,ref)=(0+4)/2=2  d(ref,f)=(1+0)/2=0.5
# sample 1: d(w,f)=(0+4)/2=2    d(w,ref)=(1+1)/2=1   d(l,f)=(4+0)/2=2    d(l,ref)=(1+1)/2=1  d(ref,f)=(1+1)/2=1
Z_DPO = [(0.5 - 2) - (2.5 - 2), (2 - 1) - (2 - 1)]  # [-2.0, 0.0]
Z_SPIN = [(0.5 - 2) - 0.5, (2 - 1) - 1]  # [-2.0, 0.0]
Z_FULL = [2 * (0.5 - 2) - (2.5 - 2) - 0.5, 2 * (2 - 1) - (2 - 1) - 1]  # [-4.0, 0.0]


def test_sq_dist_is_per_sample_mean():
    assert torch.allclose(sq_dist(WIN, PRED), torch.tensor([0.5, 2.0]))
    assert sq_dist(torch.zeros(3, 4, 5), torch.ones(3, 4, 5)).shape == (3,)


def test_full_objective_hand_computed():
    loss, parts = iupo_loss(PRED, REF, WIN, LOSE, lam=1.0, terms="full")
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
    loss2, _ = iupo_loss(PRED, REF, WIN, LOSE, lam=0.5)
    assert math.isclose(loss2.item(), base + 0.5 * pref, rel_tol=1e-6)


@pytest.mark.parametrize("terms,z", [("dpo", Z_DPO), ("spin", Z_SPIN)])
def test_ablation_terms_hand_computed(terms, z):
    _, parts = iupo_loss(PRED, REF, WIN, LOSE, terms=terms)
    assert math.isclose(parts["loss_pref"].item(), (_sp(z[0]) + _sp(z[1])) / 2, rel_tol=1e-6)


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
