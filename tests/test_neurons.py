"""Spiking neurons against the paper (Table 1), hand-computed traces and finite differences."""

from __future__ import annotations

import pytest
import torch

from bestformer.errors import ConfigError, InputError
from bestformer.neurons import LIF, ATan, LIFParameters, LIFState, Sigmoid, get_surrogate, lif_multistep

# The paper's Table 1: N = 1, T = 4, V_th = 1, decay factor 0.5 (Eq. 1 charge, i.e. decay_input=False, tau=2).
TABLE1_INPUTS = [[4, 0, 0, 0], [1, 5, 0, 0], [0, 3, 1, 0]]
TABLE1_BOOLEAN = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]
TABLE1_HR = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]
TABLE1_SR = [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0]]


def _table1(reset: str) -> list[list[int]]:
    lif = LIF(tau=2.0, v_threshold=1.0, reset=reset, decay_input=False)
    x = torch.tensor(TABLE1_INPUTS, dtype=torch.float32).T.unsqueeze(-1)  # [T=4, 3 rows, N=1]
    return lif(x).squeeze(-1).T.int().tolist()


def test_table1_hard_and_soft_reset() -> None:
    assert LIFParameters(tau=2.0).beta == 0.5
    assert _table1("hard") == TABLE1_HR
    assert _table1("soft") == TABLE1_SR
    boolean = (torch.tensor(TABLE1_INPUTS) > 0).int().tolist()
    assert boolean == TABLE1_BOOLEAN
    assert _table1("hard") == boolean  # Eq. 9's remark: HR-LIF with V_th = 1 degenerates to the boolean function


def test_decay_input_trace_by_hand() -> None:
    # H = V + (X - V) / 2: 0.75 (no spike), 0.625 (no spike), 1.3125 (spike)
    x = torch.tensor([1.5, 0.5, 2.0]).view(3, 1)
    spikes, state = LIF(reset="hard")(x, return_state=True)
    assert spikes.flatten().tolist() == [0.0, 0.0, 1.0]
    assert state.v.item() == 0.0
    spikes, state = LIF(reset="soft")(x, return_state=True)
    assert spikes.flatten().tolist() == [0.0, 0.0, 1.0]
    assert state.v.item() == pytest.approx(0.3125)


def _reference_lif(x: torch.Tensor, tau: float, vth: float, vreset: float, reset: str, decay_input: bool):
    """Independent float64 implementation written from the formulas."""
    v = torch.full_like(x[0], vreset, dtype=torch.float64)
    out = []
    for t in range(x.shape[0]):
        xt = x[t].double()
        h = v + (xt - (v - vreset)) / tau if decay_input else (1 - 1 / tau) * (v - vreset) + vreset + xt
        s = (h >= vth).double()
        v = torch.where(s > 0, torch.full_like(h, vreset), h) if reset == "hard" else h - vth * s
        out.append(s)
    return torch.stack(out), v


@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("decay_input", [True, False])
def test_lif_matches_float64_reference(reset: str, decay_input: bool) -> None:
    x = torch.randn(6, 3, 5, dtype=torch.float64) * 2
    lif = LIF(tau=3.0, v_threshold=0.7, v_reset=-0.2, reset=reset, decay_input=decay_input)
    spikes, state = lif(x, return_state=True)
    ref_s, ref_v = _reference_lif(x, 3.0, 0.7, -0.2, reset, decay_input)
    assert torch.equal(spikes, ref_s)
    assert torch.allclose(state.v, ref_v, atol=1e-12)


def test_state_carries_across_calls_and_is_not_hidden() -> None:
    lif = LIF()
    x = torch.rand(8, 2, 4) * 2
    full = lif(x)
    first, state = lif(x[:4], return_state=True)
    second = lif(x[4:], state=state)
    assert torch.equal(torch.cat([first, second]), full)
    assert torch.equal(lif(x), full)  # no state kept between forward calls


@pytest.mark.parametrize("surrogate", [Sigmoid(4.0), Sigmoid(1.5), ATan(2.0), ATan(0.7)])
def test_surrogate_derivative_matches_finite_difference(surrogate) -> None:
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)
    eps = 1e-6
    fd = (surrogate.primitive(x + eps) - surrogate.primitive(x - eps)) / (2 * eps)
    assert torch.allclose(surrogate.derivative(x), fd, atol=1e-7)
    xg = x.clone().requires_grad_(True)
    spikes = surrogate(xg)
    assert torch.equal(spikes, (x >= 0).double())
    spikes.sum().backward()
    assert torch.allclose(xg.grad, surrogate.derivative(x))


def test_first_step_gradient_is_surrogate_over_tau() -> None:
    x = torch.tensor([[0.8]], requires_grad=True)  # T=1: H = x / tau
    LIF(tau=2.0, surrogate=Sigmoid(4.0))(x).sum().backward()
    expected = Sigmoid(4.0).derivative(torch.tensor(0.4 - 1.0)) / 2
    assert x.grad.item() == pytest.approx(expected.item(), rel=1e-6)


def test_functional_and_module_agree() -> None:
    x = torch.randn(5, 3, 7)
    lif = LIF(reset="soft", v_threshold=0.5)
    spikes, _ = lif_multistep(x, lif.params, lif.surrogate, LIFState(torch.zeros(3, 7)))
    assert torch.equal(lif(x), spikes)


def test_bad_neuron_options_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="tau must be > 1"):
        LIF(tau=0.5)
    with pytest.raises(ConfigError, match="reset must be 'hard' or 'soft'"):
        LIF(reset="medium")
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        get_surrogate("sigmoyd")
    with pytest.raises(ConfigError, match="alpha"):
        Sigmoid(alpha=0)
    with pytest.raises(ConfigError, match="alpha=3 was given with a Sigmoid surrogate of alpha=4"):
        get_surrogate(Sigmoid(), alpha=3)  # silently ignored before
    assert get_surrogate(None, alpha=2.5).alpha == 2.5 and get_surrogate(ATan(2.0), alpha=2.0).alpha == 2.0
    with pytest.raises(InputError, match="time-first"):
        LIF()(torch.ones(3))


def test_every_neuron_runs_through_the_one_time_loop() -> None:
    from bestformer.neurons import IELIFParameters, TernaryParameters, ielif_multistep, run_multistep, ternary_multistep

    x = torch.randn(4, 2, 3)
    ran = []

    def counting(state: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ran.append(1)
        return x_t + state, state + 1

    out, final = run_multistep(counting, x, None, torch.zeros_like, "test neuron")
    assert len(ran) == 4 and torch.equal(out, x + torch.arange(4.0).view(4, 1, 1)) and torch.equal(final, 4 + 0 * x[0])
    for run in (lambda z: lif_multistep(z, LIFParameters(), Sigmoid()), lambda z: ielif_multistep(z, IELIFParameters()),
                lambda z: ternary_multistep(z, TernaryParameters(), Sigmoid())):
        with pytest.raises(InputError, match="time-first"):
            run(torch.ones(0, 3))


def test_use_backend_is_scoped_and_a_module_backend_wins() -> None:
    from bestformer.neurons import get_backend, use_backend

    before = get_backend()
    x = torch.randn(3, 2, 4, requires_grad=True)
    with use_backend("plain"):
        assert get_backend() == "plain"
        assert LIF()(x).grad_fn.name() != "FusedLIFFunctionBackward"
        assert LIF(backend="fused")(x).grad_fn.name() == "FusedLIFFunctionBackward"
    assert get_backend() == before
    with pytest.raises(ConfigError, match="did you mean 'plain'"), use_backend("plian"):
        pass


def test_relu_neuron_takes_spiking_options_and_rejects_others() -> None:
    from bestformer.neurons import get_neuron

    relu = get_neuron("relu")(v_threshold=0.5, reset="soft", amplitude=2.0, rectify_channels=4, decay_input=False)
    assert torch.equal(relu(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    with pytest.raises(ConfigError, match="no option 'v_treshold' \\(did you mean 'v_threshold'"):
        get_neuron("relu")(v_treshold=0.5)
