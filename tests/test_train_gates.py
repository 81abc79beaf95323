"""Gate math, target ramp and exact binarisation of consa_vllm.train (pure functions, no model)."""

import math

import pytest
import torch

from consa_vllm.allocation.rules import sliding_count
from consa_vllm.train.gates import (BETA, LOG_RATIO, binarize_topk, expected_sparsity, mask_to_pattern, prob_nonzero,
                                    sample_z)
from consa_vllm.train.lagrangian import Lagrangian, target_at


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 1.0, 3.0])
def test_prob_nonzero_matches_monte_carlo(log_alpha):
    la = torch.full((200_000,), log_alpha)
    z = sample_z(la, generator=torch.Generator().manual_seed(0))
    mc = (z > 0).float().mean().item()
    assert abs(mc - prob_nonzero(torch.tensor(log_alpha)).item()) < 0.005
    assert math.isclose(prob_nonzero(torch.tensor(log_alpha)).item(),
                        1 / (1 + math.exp(-(log_alpha - BETA * LOG_RATIO))), rel_tol=1e-6)


def test_z_in_unit_interval_with_point_masses():
    z = sample_z(torch.zeros(100_000), generator=torch.Generator().manual_seed(1))
    assert z.min().item() == 0.0 and z.max().item() == 1.0
    p0, p1 = (z == 0).float().mean().item(), (z == 1).float().mean().item()
    assert 0.05 < p0 < 0.5 and 0.05 < p1 < 0.5  # real point masses at both ends
    assert ((z > 0) & (z < 1)).float().mean().item() > 0.3  # and a continuous part between


def test_sample_is_differentiable():
    la = torch.tensor([0.5, -0.5], requires_grad=True)
    sample_z(la, u=torch.tensor([0.5, 0.5])).sum().backward()
    assert la.grad is not None and (la.grad > 0).all()


def test_expected_sparsity_global_and_per_layer():
    la = torch.tensor([[10.0, 10.0], [-10.0, 10.0]])
    assert expected_sparsity(la).item() == pytest.approx(0.25, abs=1e-3)
    assert expected_sparsity(la, per_layer=True).tolist() == pytest.approx([0.0, 0.5], abs=1e-3)


def test_binarize_global_exact():
    torch.manual_seed(0)
    la = torch.randn(7, 5)
    for rho in (0.0, 0.2, 0.4, 0.6, 1.0):
        keep = binarize_topk(la, rho)
        assert (~keep).sum().item() == round(rho * 35)
        if 0 < rho < 1:  # the S units are exactly the lowest log_alpha
            assert la[~keep].max() < la[keep].min()


def test_binarize_per_layer_exact_and_ties_deterministic():
    la = torch.zeros(3, 8)  # all tied: lowest indices go first
    keep = binarize_topk(la, 0.25, per_layer=True)
    assert mask_to_pattern(keep, 8) == ["SSFFFFFF"] * 3
    torch.manual_seed(1)
    la = torch.randn(6, 8)
    keep = binarize_topk(la, 0.5, per_layer=True)
    assert ((~keep).sum(dim=1) == 4).all()


def test_layer_units_expand_and_rounding():
    keep = binarize_topk(torch.tensor([[1.0], [-1.0], [2.0], [-2.0]]), 0.5)
    assert mask_to_pattern(keep, 3) == ["FFF", "SSS", "FFF", "SSS"]
    # The one rounding rule (allocation.rules.sliding_count), halves up, also where the float product misses the half.
    assert sliding_count(0.5, 8) == 4 and sliding_count(0.3, 28) == 8 and sliding_count(0.125, 4) == 1
    assert sliding_count(0.58, 25) == 15 and sliding_count(0.125, 12) == 2
    assert ((~binarize_topk(torch.zeros(25), 0.58)).sum().item()) == 15


def test_target_ramp():
    assert target_at(0, 100, 0.5, 0.5) == 0.0
    assert target_at(25, 100, 0.5, 0.5) == pytest.approx(0.25)
    assert target_at(50, 100, 0.5, 0.5) == 0.5 and target_at(99, 100, 0.5, 0.5) == 0.5
    assert target_at(0, 100, 0.5, 0.0) == 0.5


def test_lagrangian_ascent_signs():
    lag = Lagrangian(2)
    opt = lag.optimizer(0.1)
    s = torch.tensor([0.1, 0.9])
    for _ in range(3):
        lag(s, 0.5).backward()
        opt.step()
        opt.zero_grad()
    # below target -> lambda1 < 0 (rewards more sparsity); above -> > 0; lambda2 only grows
    assert lag.lambda1[0] < 0 < lag.lambda1[1]
    assert (lag.lambda2 > 0).all()
