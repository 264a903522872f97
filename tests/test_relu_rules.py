"""ReLU backward rules on every ReLU-like op (modules, in-place, shared, functional)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnwidgets.engine.hooks import hook_count
from cnnwidgets.engine.relu_rules import relu_rule


class Mixed(nn.Module):
    """x → ·2 → ReLU6 (in-place module) → −1 → F.relu → ·3 → shared ReLU module twice."""

    def __init__(self):
        super().__init__()
        self.r6 = nn.ReLU6(inplace=True)
        self.shared = nn.ReLU()

    def forward(self, x):
        y = F.relu(self.r6(x * 2) - 1) * 3
        return self.shared(self.shared(y - 4) + 1)


X = torch.tensor([-1.0, 0.25, 1.0, 4.0])
R = torch.tensor([1.0, -1.0, 1.0, 1.0])


def grad(rule):
    m = Mixed()
    x = X.clone().requires_grad_(True)
    ctx = relu_rule(rule) if rule else torch.enable_grad()
    with ctx:
        y = m(x)
    (g,) = torch.autograd.grad(y, x, R)
    assert hook_count(m) == 0
    return y.detach(), g


def test_forward_unchanged_and_gradient_rule_is_autograd():
    y0, g0 = grad(None)
    y1, g1 = grad("gradient")
    # 2x = (−2, .5, 2, 8) → relu6 (0, .5, 2, 6) → −1, relu → (0, 0, 1, 5) → ·3 (0, 0, 3, 15)
    # → −4, relu → (0, 0, 0, 11) → +1, relu → (1, 1, 1, 12)
    assert torch.equal(y0, torch.tensor([1.0, 1.0, 1.0, 12.0]))
    assert torch.equal(y1, y0)
    assert torch.allclose(g1, g0)


def test_deconvnet_rule_hand_worked():
    # backward of R = (1, −1, 1, 1): outer relu (input > 0 everywhere) passes relu(R) =
    # (1, 0, 1, 1); inner shared relu: relu → (1, 0, 1, 1); ·3 → (3, 0, 3, 3); F.relu: relu → same;
    # ReLU6: relu → same; ·2 → (6, 0, 6, 6). The plain gradient is (0, 0, 0, 0): entries 0–2 are
    # cut by the inner relu (input −4, −4, −1) and entry 3 by ReLU6's cap (2·4 = 8 > 6).
    _, g = grad("deconvnet")
    assert torch.allclose(g, torch.tensor([6.0, 0.0, 6.0, 6.0]))
    _, g0 = grad(None)
    assert torch.allclose(g0, torch.zeros(4))


def test_guided_rule_hand_worked():
    # guided = plain mask · 1[R > 0] · R at every op: same cuts as the gradient, here all zero;
    # with R = (1, 1, 1, 1) on x = 1 (2x = 2 inside ReLU6, 3 − 4 < 0 cut by inner relu) → 0
    _, g = grad("guided")
    assert torch.allclose(g, torch.zeros(4))
    m = nn.Sequential(nn.ReLU())
    x = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    with relu_rule("guided"):
        y = m(x)
    (g,) = torch.autograd.grad(y, x, torch.tensor([5.0, -2.0, 4.0]))
    assert torch.equal(g, torch.tensor([0.0, 0.0, 4.0]))


def test_functional_mode_leaves_after_exception():
    m = Mixed()
    with pytest.raises(RuntimeError):
        with relu_rule("deconvnet"):
            raise RuntimeError("x")
    assert hook_count(m) == 0
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(x), x, torch.tensor([-1.0, -1.0]))
    assert torch.equal(g, torch.tensor([0.0, -1.0]))  # plain autograd again, mode is gone
    with pytest.raises(ValueError, match="rule must be one of"):
        with relu_rule("magic"):
            pass
