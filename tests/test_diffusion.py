import pytest
import torch

from diffmic.diffusion import NoiseSchedule, antithetic_timesteps, mmd, sample


@pytest.fixture
def schedule():
    return NoiseSchedule.linear(1000, 1e-4, 0.02)


def test_linear_betas_and_decreasing_cumulative_alphas(schedule):
    assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)
    abar = schedule.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0 < abar[-1].item() < 1e-4  # nearly pure noise at T


def test_q_sample_at_t0_returns_y0_and_at_T_the_prior(schedule):
    y0 = torch.eye(4)
    prior = torch.full((4, 4), 0.25)
    noise = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    start = schedule.q_sample(y0, prior, torch.zeros(4, dtype=torch.long), torch.zeros(4, 4))
    torch.testing.assert_close(start, y0)
    end = schedule.q_sample(y0, prior, torch.full((4,), 1000), torch.zeros(4, 4))
    torch.testing.assert_close(end, prior, atol=1e-2, rtol=0)
    # The noise enters with sqrt(1 - abar_t).
    mid = schedule.q_sample(y0, prior, torch.full((4,), 500), noise) - schedule.q_sample(
        y0, prior, torch.full((4,), 500), torch.zeros(4, 4))
    # Step t = 500 sits at array position 499.
    torch.testing.assert_close(mid, noise * (1 - schedule.alphas_cumprod[499]).sqrt().float())


def test_posterior_coefficients_equal_their_closed_forms(schedule):
    c = schedule.posterior_coefficients()
    for t in (1, 17, 500, 999):
        beta, abar, abar_prev = (schedule.betas[t].item(), schedule.alphas_cumprod[t].item(),
                                 schedule.alphas_cumprod[t - 1].item())
        alpha = 1 - beta
        assert c["g0"][t].item() == pytest.approx(beta * abar_prev ** 0.5 / (1 - abar), rel=1e-12)
        assert c["g1"][t].item() == pytest.approx((1 - abar_prev) * alpha ** 0.5 / (1 - abar), rel=1e-12)
        assert c["g2"][t].item() == pytest.approx(
            1 + (abar ** 0.5 - 1) * (alpha ** 0.5 + abar_prev ** 0.5) / (1 - abar), rel=1e-9, abs=1e-11)
        assert c["beta_tilde"][t].item() == pytest.approx((1 - abar_prev) / (1 - abar) * beta, rel=1e-12)


def test_posterior_mean_is_the_exact_posterior_of_the_forward_process(schedule):
    # With the true eps, one reverse mean step from y_t equals E[y_{t-1} | y_t, y_0] of q.
    c = schedule.posterior_coefficients()
    t = 300
    g0, g1, g2 = c["g0"][t], c["g1"][t], c["g2"][t]
    # The coefficients must reproduce y_0 (with the prior) when y_t is noiseless: the mean of
    # q(y_{t-1} | y_t = E[y_t], y_0) is E[y_{t-1}].
    abar, abar_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t - 1]
    y0, prior = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.3, 0.7], dtype=torch.float64)
    y_t = abar.sqrt() * y0 + (1 - abar.sqrt()) * prior
    expected_prev = abar_prev.sqrt() * y0 + (1 - abar_prev.sqrt()) * prior
    torch.testing.assert_close(g0 * y0 + g1 * y_t + g2 * prior, expected_prev)


def test_respaced_schedule_with_all_steps_equals_the_original(schedule):
    same = schedule.respaced(1000)
    torch.testing.assert_close(same.betas, schedule.betas)
    assert torch.equal(same.timesteps, schedule.timesteps)


def test_respaced_schedule_keeps_the_cumulative_alphas_of_its_steps(schedule):
    short = schedule.respaced(10)
    assert len(short) == 10 and short.timesteps[0] == 1 and short.timesteps[-1] == 1000
    torch.testing.assert_close(short.alphas_cumprod, schedule.alphas_cumprod[short.timesteps - 1])


def test_truncated_schedule_is_the_head_of_the_chain(schedule):
    head = schedule.truncated(250)
    assert torch.equal(head.betas, schedule.betas[:250]) and head.timesteps[-1] == 250


def test_antithetic_timesteps_come_in_mirrored_pairs():
    t = antithetic_timesteps(9, 1000, generator=torch.Generator().manual_seed(1))
    assert t.shape == (9,) and int(t.min()) >= 1 and int(t.max()) <= 1000
    torch.testing.assert_close(t[:4] + t[5:9], torch.full((4,), 1001))


def test_sampler_with_a_perfect_denoiser_recovers_y0(schedule):
    # If eps_theta returns the true noise of the forward process, every sampler lands on y0.
    y0 = torch.eye(3).repeat(2, 1).double()
    prior = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), -1).double()
    for sampler in ("respaced", "truncated", "ddim"):
        chain = schedule.respaced(50) if sampler != "truncated" else schedule.truncated(50)
        abar = chain.alphas_cumprod
        lookup = {int(t): i for i, t in enumerate(chain.timesteps)}

        def oracle(y_t, t):
            a = abar[lookup[int(t[0])]]
            return (y_t - a.sqrt() * y0 - (1 - a.sqrt()) * prior) / (1 - a).sqrt()

        out, _ = sample(oracle, prior, schedule, sampler, 50, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(out, y0, atol=1e-6, rtol=0)


def test_sampler_uses_given_noise_and_records_a_trajectory(schedule):
    prior = torch.full((4, 3), 1 / 3)
    noise = torch.randn(11, 4, 3, generator=torch.Generator().manual_seed(3))
    zero = lambda y, t: torch.zeros_like(y)  # noqa: E731
    first, trajectory = sample(zero, prior, schedule, "respaced", 10, noise=noise, record_every=5)
    again, _ = sample(zero, prior, schedule, "respaced", 10, noise=noise)
    torch.testing.assert_close(first, again)
    assert [t for t, _ in trajectory] == [1000, 445, 0]
    torch.testing.assert_close(trajectory[0][1], prior + noise[0])
    with pytest.raises(ValueError, match="noise must have shape"):
        sample(zero, prior, schedule, "respaced", 10, noise=noise[:5])


def test_denoiser_is_called_once_per_step(schedule):
    calls = []

    def count(y, t):
        calls.append(int(t[0]))
        return torch.zeros_like(y)

    sample(count, torch.full((2, 3), 1 / 3), schedule, "respaced", 100)
    assert len(calls) == 100 and calls[0] == 1000 and calls[-1] == 1


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift():
    x = torch.randn(64, 7, generator=torch.Generator().manual_seed(0))
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd(x, x[torch.randperm(64)]).item() == pytest.approx(0.0, abs=1e-6)
    shifts = [mmd(x, x + s).item() for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(b > a > 0 for a, b in zip(shifts, shifts[1:]))


def test_mmd_is_differentiable_on_identical_rows():
    x = torch.randn(8, 3, requires_grad=True)
    mmd(x, torch.randn(8, 3)).backward()
    assert torch.isfinite(x.grad).all()


def test_grouped_mmd_is_the_mean_of_each_groups_mmd():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 16, 5, generator=generator), torch.randn(3, 16, 5, generator=generator) + 0.5
    per_group = torch.stack([mmd(x[g], y[g]) for g in range(3)])
    assert mmd(x, y).item() == pytest.approx(per_group.mean().item(), rel=1e-6)
    assert mmd(x, y).item() != pytest.approx(mmd(x.reshape(48, 5), y.reshape(48, 5)).item(), rel=1e-3)
    with pytest.raises(ValueError, match="equal groups"):
        mmd(x, y[:2])
