"""The Iteratively Updated Preference Objective (paper Eq. 4-7, derivation Eq. 8-19).

With f = aligner, f_ref = reference aligner (no gradient), c = (h, c_I^l),
w = c_I^w, l = c_I^l, and d(a, b) = ||a - b||_2^2, the squared L2 norm over all
tokens and channels of one sample (``distance="sum"``, as Eq. 4 and 6 write it)::

    L_base = mean_b d(w, f(c))
    z      = 2 (d(w,f) - d(w,ref)) - (d(l,f) - d(l,ref)) - d(ref,f)
    L_pref = mean_b log(1 + exp(z))                      # softplus(z)
    L      = L_base + lam * L_pref

Usage in a training step::

    ref = make_reference(cfg, seed=1)          # randomly initialised, frozen
    keeper = ReferenceKeeper(k=10)
    pred = model(h, l, mask); ref_pred = ref(h, l, mask)
    loss, parts = iupo_loss(pred, ref_pred, w, l, lam=1.0, terms="full", distance="sum")
    ...
    if keeper.observe(parts["d_win"], parts["d_win_ref"]):   # the same d as the loss
        copy_into_reference(model, ref)

**Distance.** ``distance="sum"`` (default) is the paper's ||.||_2^2. ``distance="mean"``
divides it by N x D (the per-element mean squared error), an ablation. The two
differ by a constant factor inside L_base, so for L_base alone they only rescale
the gradient (which AdamW largely undoes). Inside the softplus they do not: with
the mean, z stays near 0 for any realistic N x D, so L_pref sits at log 2 and acts
as a fixed linear push, the very thing Appendix B.2 chose the logistic loss to
avoid; with the sum, z is of the order of the distances themselves, and L_pref
acts like a hinge: about zero once f beats the reference by a margin, linear
otherwise. Every d the trainer logs and the ReferenceKeeper compares uses the
run's distance (a comparison gives the same answer under either form).

Which terms are DPO and which are SPIN. With log p(x|c) = -||x - f(c)||^2 + const
(Gaussian, Eq. 8-9, eta = mu = 1), the DPO margin of Eq. 5 / 16 is

    log p(w)/p_ref(w) - log p(l)/p_ref(l) = -(d(w,f) - d(w,ref)) + (d(l,f) - d(l,ref))

and the SPIN margin, whose "rejected" sample is x_ref = f_ref(c) (so d(x_ref, ref) = 0), is

    log p(w)/p_ref(w) - log p(x_ref)/p_ref(x_ref) = -(d(w,f) - d(w,ref)) + d(ref,f).

Both contain the winner term once, which is why it carries the factor 2 in
Eq. 6 / 17. With l(a) = log(1 + exp(-a)) applied to the sum, l(margin) =
softplus(z) with z = -(margin). So the ablations are

    terms="dpo":  z = (d(w,f) - d(w,ref)) - (d(l,f) - d(l,ref))
    terms="spin": z = (d(w,f) - d(w,ref)) - d(ref,f)
    terms="full": z = z_dpo + z_spin                     (the paper's objective)
    terms="base": L_pref = 0, same as lam = 0

and full = dpo + spin exactly (a test checks it). Note that the split is not
"2(...) - (...)" vs "-d(ref,f)": the winner term belongs to both.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from img.aligner import AlignerConfig, ImplicitAligner
from img.errors import UserError

log = logging.getLogger(__name__)

Terms = Literal["full", "dpo", "spin", "base"]
TERMS: tuple[str, ...] = ("full", "dpo", "spin", "base")
Distance = Literal["sum", "mean"]
DISTANCES: tuple[str, ...] = ("sum", "mean")
DISTANCE_NAMES = {"sum": "squared L2 norm (sum over tokens and channels)",
                  "mean": "mean squared error (squared L2 norm / (N x D))"}


def check_distance(distance: str) -> str:
    """``distance`` if it is "sum" or "mean"; UserError otherwise."""
    if distance not in DISTANCES:
        raise UserError(f"distance={distance!r} is not one of {list(DISTANCES)}. Set `distance` in the train TOML "
                        "(\"sum\" is the paper's squared L2 norm).")
    return distance


def sq_dist(a: torch.Tensor, b: torch.Tensor, distance: Distance = "sum") -> torch.Tensor:
    """d(a, b) per sample, in fp32, shape (B,): ||a - b||_2^2 over every non-batch element ("sum"),
    or that divided by the number of elements ("mean")."""
    sq = (a.float() - b.float()).pow(2).flatten(1)
    return sq.sum(dim=1) if check_distance(distance) == "sum" else sq.mean(dim=1)


def iupo_loss(
    pred: torch.Tensor,
    ref_pred: torch.Tensor,
    win: torch.Tensor,
    lose: torch.Tensor,
    lam: float = 1.0,
    terms: Terms = "full",
    distance: Distance = "sum",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss L = L_base + lam * L_pref for one batch (Eq. 7), plus detached parts for logging.

    pred = f(c) (with grad), ref_pred = f_ref(c) (detached here), win = c_I^w, lose = c_I^l,
    all shaped (B, N, D). ``distance``: "sum" (||.||_2^2, the paper's) or "mean" (divided by N x D).
    ``parts`` holds 0-dim detached tensors, every d in that distance: loss, loss_base, loss_pref,
    d_win, d_win_ref, d_lose, d_lose_ref, d_ref, z, and win_vs_ref (the share of samples with
    d(w,f) < d(w,ref)).
    """
    if terms not in TERMS:
        raise UserError(f"objective terms={terms!r} is not one of {list(TERMS)}. Set `terms` in the train TOML.")
    if not (pred.shape == ref_pred.shape == win.shape == lose.shape):
        raise ValueError(f"shape mismatch: pred {pred.shape}, ref {ref_pred.shape}, win {win.shape}, lose {lose.shape}")
    check_distance(distance)
    ref_pred = ref_pred.detach()
    d_w, d_l = sq_dist(win, pred, distance), sq_dist(lose, pred, distance)
    d_w_ref, d_l_ref = sq_dist(win, ref_pred, distance), sq_dist(lose, ref_pred, distance)
    d_ref = sq_dist(ref_pred, pred, distance)
    z_dpo = (d_w - d_w_ref) - (d_l - d_l_ref)
    z_spin = (d_w - d_w_ref) - d_ref
    z = {"full": z_dpo + z_spin, "dpo": z_dpo, "spin": z_spin, "base": torch.zeros_like(d_w)}[terms]
    loss_base = d_w.mean()
    loss_pref = F.softplus(z).mean() if terms != "base" else d_w.new_zeros(())
    loss = loss_base + lam * loss_pref
    parts = {
        "loss": loss.detach(),
        "loss_base": loss_base.detach(),
        "loss_pref": loss_pref.detach(),
        "d_win": d_w.detach().mean(),
        "d_win_ref": d_w_ref.mean(),
        "d_lose": d_l.detach().mean(),
        "d_lose_ref": d_l_ref.mean(),
        "d_ref": d_ref.detach().mean(),
        "z": z.detach().mean(),
        "win_vs_ref": (d_w.detach() < d_w_ref).float().mean(),
    }
    return loss, parts


class ReferenceKeeper:
    """Decides when to copy f into f_ref (Eq. 18): after k consecutive strict wins.

    Pass it d(w, f(c)) and d(w, f_ref(c)) in the loss's distance (``parts["d_win"]``,
    ``parts["d_win_ref"]`` of :func:`iupo_loss`). A step is a win when the batch-mean d(w, f(c)) is *strictly* below the batch-mean
    d(w, f_ref(c)); a tie is not a win. A non-win resets the streak; so does each copy.
    Note: the step right after a copy compares f with itself (f == f_ref before that
    step's update), a tie, so while f keeps improving copies come every k + 1 steps.
    In multi-rank training, pass the all-reduced means so every rank decides alike.
    """

    def __init__(self, k: int = 10) -> None:
        if k < 1:
            raise UserError(f"reference update k={k} must be >= 1. The paper uses k = 10.")
        self.k = k
        self.streak = 0
        self.copies = 0

    def observe(self, d_theta_w: float | torch.Tensor, d_ref_w: float | torch.Tensor) -> bool:
        """Record one step; True means: copy f into f_ref now."""
        if float(d_theta_w) < float(d_ref_w):
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.k:
            self.streak = 0
            self.copies += 1
            return True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"k": self.k, "streak": self.streak, "copies": self.copies}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.k, self.streak, self.copies = int(state["k"]), int(state["streak"]), int(state["copies"])


def make_reference(config: AlignerConfig, seed: int, init: Literal["random", "identity"] = "random") -> ImplicitAligner:
    """The initial reference aligner: frozen, in eval mode, never trained.

    "Randomly initialised" (paper Sec. 3.4, App. B.2). The aligner's own init zeroes
    ``zero_linear``, which makes *any* freshly built aligner the identity whatever its
    seed, i.e. functionally a copy of f at step 0. So for ``init="random"`` we build the
    network from its own ``seed`` and then give ``zero_linear`` PyTorch's default Linear
    init (Kaiming-uniform weight, uniform bias) as well: f_ref(c) = c_I^l + a random
    function of (h, c_I^l). The aligner (identity) then beats it on d(w, .) from the
    first steps and the first copy comes after about k steps; from then on f_ref is a
    true earlier copy of f. ``init="identity"`` keeps the zero head (an ablation).
    The global RNG is left untouched, so the trained model's init does not depend on it.
    """
    if init not in ("random", "identity"):
        raise UserError(f"reference_init={init!r} must be 'random' or 'identity'. Set it in the train TOML.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = ImplicitAligner(config)
        if init == "random":
            ref.zero_linear.reset_parameters()
    ref.requires_grad_(False)
    return ref.eval()


@torch.no_grad()
def copy_into_reference(model: nn.Module, ref: nn.Module) -> None:
    """f_ref <- f (parameters and buffers), keeping f_ref's dtype and frozen state."""
    src = model.state_dict()
    for k, v in ref.state_dict().items():
        v.copy_(src[k].to(v.dtype))
