"""Range observers: min/max, moving average, percentile, MSE and KL on weights and activation streams."""

from __future__ import annotations

import pytest
import torch

from hf_compress.quant.affine import QuantSpec, compute_qparams, fake_quantize, qparams_from_minmax, quantization_error
from hf_compress.quant.observers import (
    HistogramObserver,
    KLObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)

NAMES = ["minmax", "moving-average", "percentile", "mse", "kl"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def outlier_data():
    """A Gaussian bulk with 8 huge outliers (0.006% of the values) and a mask of the bulk."""
    x = randn(32, 4096)
    bulk = torch.ones_like(x, dtype=torch.bool)
    pos = torch.tensor([5, 901, 20_000, 47_777, 73_456, 100_001, 120_000, 131_000])
    vals = torch.tensor([60.0, -55.0, 80.0, -70.0, 65.0, -90.0, 75.0, -60.0])
    x.view(-1)[pos] = vals
    bulk.view(-1)[pos] = False
    return x, bulk


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_observers_beat_minmax_on_bulk(outlier_data, bits, symmetric):
    x, bulk = outlier_data
    spec = QuantSpec(bits, symmetric=symmetric)
    ref = MinMaxObserver(spec)
    ref.observe(x)
    rlo, rhi = ref.compute_range()
    assert rlo.item() == -90.0 and rhi.item() == 80.0
    ref_err = quantization_error(x[bulk], fake_quantize(x, *ref.compute_qparams(), spec)[bulk])
    # MSE also weighs the outliers' clipping error, so it clips less than the bulk-only statistics.
    for name, factor in [("percentile", 0.2), ("kl", 0.2), ("mse", 0.9)]:
        obs = make_observer(name, spec)
        obs.observe(x)
        lo, hi = obs.compute_range()
        assert lo.shape == hi.shape == ()
        assert hi - lo < factor * (rhi - rlo), (name, lo.item(), hi.item())
        scale, zero = obs.compute_qparams()
        err = quantization_error(x[bulk], fake_quantize(x, scale, zero, spec)[bulk])
        assert err < factor * ref_err, (name, err.item(), ref_err.item())


def test_minmax_over_batches_equals_concatenation():
    a, b = randn(5, 8, seed=1), randn(3, 8, seed=2) * 4
    for spec in (QuantSpec(8), QuantSpec(8, symmetric=False, granularity="channel", axis=-1)):
        obs = MinMaxObserver(spec)
        obs.observe(a)
        obs.observe(b)
        s, z = obs.compute_qparams()
        s_ref, z_ref = compute_qparams(torch.cat([a, b]), spec)
        assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


def test_moving_average_matches_hand_computed_ema():
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.5, 5.0])]
    obs = MovingAverageMinMaxObserver(QuantSpec(8, symmetric=False), averaging_constant=0.25)
    for b in batches:
        obs.observe(b)
    lo, hi = -1.0, 2.0
    for b in batches[1:]:
        lo = lo + 0.25 * (b.min().item() - lo)
        hi = hi + 0.25 * (b.max().item() - hi)
    got_lo, got_hi = obs.compute_range()
    assert got_lo.item() == pytest.approx(lo) and got_hi.item() == pytest.approx(hi)
    # running min/max are still tracked alongside
    assert obs.min_val.item() == -3.0 and obs.max_val.item() == 5.0


def test_percentile_averages_batches():
    a, b = randn(1000, seed=3), randn(1000, seed=4) * 2
    obs = PercentileObserver(QuantSpec(8, symmetric=False), percentile=99.0)
    obs.observe(a)
    obs.observe(b)
    q = torch.tensor([0.01, 0.99])
    expected = (torch.quantile(a, q) + torch.quantile(b, q)) / 2
    lo, hi = obs.compute_range()
    torch.testing.assert_close(torch.stack([lo, hi]), expected)


def test_percentile_samples_huge_batches():
    x = randn(3000)
    obs = PercentileObserver(QuantSpec(8), percentile=99.0, max_samples=1000)
    obs.observe(x)
    lo, hi = obs.compute_range()
    exact = torch.quantile(x, torch.tensor([0.01, 0.99]))
    assert abs(lo - exact[0]) < 0.4 and abs(hi - exact[1]) < 0.4


@pytest.mark.parametrize("name", NAMES[:4])
def test_per_channel_activation_stream_shapes(name):
    spec = QuantSpec(8, symmetric=False, granularity="channel", axis=-1)
    obs = make_observer(name, spec)
    obs.observe(randn(2, 7, 16, seed=1))
    obs.observe(randn(5, 3, 16, seed=2))  # different leading sizes
    lo, hi = obs.compute_range()
    assert lo.shape == hi.shape == (16,) and (lo <= hi).all()
    s, z = obs.compute_qparams()
    assert s.shape == z.shape == (16,) and s.dtype == torch.float32 and z.dtype == torch.int32


@pytest.mark.parametrize("name", NAMES[:4])
def test_per_group_weight_shapes(name):
    spec = QuantSpec(4, symmetric=False, signed=False, granularity="group", group_size=4)
    obs = make_observer(name, spec)
    w = randn(6, 10)
    obs.observe(w)
    s, z = obs.compute_qparams()
    assert s.shape == z.shape == (6, 3)
    if name == "minmax":
        s_ref, z_ref = compute_qparams(w, spec)
        assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    with pytest.raises(ValueError, match="same shape"):
        obs.observe(randn(4, 10))


def test_mse_per_group_picks_best_shrink_per_group():
    spec = QuantSpec(3, symmetric=True, granularity="group", group_size=64)
    w = randn(4, 150)
    w[0, 3] = 12.0  # one outlier in group (0, 0)
    obs = MSEObserver(spec, grid=20, max_shrink=0.5)
    obs.observe(w)
    lo, hi = obs.compute_range()
    mm_lo, mm_hi = obs.min_val, obs.max_val
    # every unit's choice is one of the candidates and at least as good as no shrinking
    ratio = hi / mm_hi
    assert ((ratio >= 0.5 - 1e-6) & (ratio <= 1 + 1e-6)).all()
    s_best, z_best = qparams_from_minmax(lo, hi, spec)
    s_mm, z_mm = qparams_from_minmax(mm_lo, mm_hi, spec)
    err_best = (fake_quantize(w, s_best, z_best, spec) - w).square()
    err_mm = (fake_quantize(w, s_mm, z_mm, spec) - w).square()
    assert err_best.sum() < err_mm.sum()
    assert ratio[0, 0] < 1.0  # the outlier group is clipped


def test_mse_reservoir_is_bounded_and_deterministic():
    spec = QuantSpec(8, symmetric=False)

    def run():
        obs = MSEObserver(spec, max_samples=500, grid=10)
        for i in range(4):
            obs.observe(randn(300, seed=i))
        assert obs._values.shape == (1, 500)
        return obs.compute_qparams()

    (s1, z1), (s2, z2) = run(), run()
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_histogram_grows_range_exactly():
    obs = HistogramObserver(QuantSpec(8), bins=256)
    obs.observe(torch.tensor([0.5, -1.0]))
    assert obs.bin_width == pytest.approx(1.0 / 256)
    obs.observe(torch.tensor([3.0, 0.1]))  # beyond the range: width grows by 4
    assert obs.bin_width == pytest.approx(4.0 / 256)
    assert obs.hist.sum().item() == 4
    # Old bins merge whole into new ones: 0.5 (old bin 128) -> 32, 1.0 (old last bin 255) -> 63.
    nonzero = {int(i): obs.hist[i].item() for i in obs.hist.nonzero().flatten()}
    assert nonzero == {int(0.1 / obs.bin_width): 1, 32: 1, 63: 1, 192: 1}


def test_kl_asymmetric_relu_like():
    x = torch.relu(randn(100_000)) - 0.1
    x[:3] = torch.tensor([40.0, 50.0, 45.0])
    spec = QuantSpec(8, symmetric=False)
    obs = KLObserver(spec)
    obs.observe(x)
    lo, hi = obs.compute_range()
    assert lo.item() == pytest.approx(-0.1, abs=0.05)
    assert 2.0 < hi.item() < 20.0


def test_kl_rejects_non_tensor_granularity():
    with pytest.raises(ValueError, match="granularity='tensor' only"):
        KLObserver(QuantSpec(8, granularity="channel"))


@pytest.mark.parametrize("name", NAMES)
def test_no_data_error_and_reset(name):
    obs = make_observer(name, QuantSpec(8))
    with pytest.raises(
        RuntimeError, match=r"observer has seen no data: call observe\(\) with calibration tensors first"
    ):
        obs.compute_qparams()
    obs.observe(randn(100))
    obs.compute_qparams()
    obs.reset()
    with pytest.raises(RuntimeError, match="no data"):
        obs.compute_range()


@pytest.mark.parametrize("name", NAMES)
def test_determinism(name):
    def run():
        obs = make_observer(name, QuantSpec(4, symmetric=False))
        for i in range(3):
            obs.observe(randn(50, 40, seed=i) * (i + 1))
        return obs.compute_qparams()

    (s1, z1), (s2, z2) = run(), run()
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_observe_rejects_nan_and_empty():
    obs = MinMaxObserver(QuantSpec(8))
    with pytest.raises(ValueError, match="NaN or inf"):
        obs.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        obs.observe(torch.empty(0))


def test_factory_and_option_validation():
    assert isinstance(make_observer("kl", QuantSpec(8)), HistogramObserver)
    assert isinstance(
        make_observer("moving-average", QuantSpec(8), averaging_constant=0.5), MovingAverageMinMaxObserver
    )
    with pytest.raises(ValueError, match="unknown observer 'foo'"):
        make_observer("foo", QuantSpec(8))
    with pytest.raises(ValueError, match="percentile must be"):
        PercentileObserver(QuantSpec(8), percentile=30)
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(QuantSpec(8), averaging_constant=0)
    with pytest.raises(ValueError, match="max_shrink"):
        MSEObserver(QuantSpec(8), max_shrink=1.0)
    with pytest.raises(ValueError, match="bins must be"):
        HistogramObserver(QuantSpec(8), bins=64)


def _kl_reference(hist: torch.Tensor, a: int, b: int, nq: int) -> float:
    """Straightforward per-window KL, as in TensorRT / pytorch-quantization's entropy calibration."""
    seg = hist[a:b]
    n = b - a
    p = seg.clone()
    p[0] += hist[:a].sum()
    p[-1] += hist[b:].sum()
    chunk = torch.arange(n) * nq // n
    nz = seg > 0
    qsum = torch.zeros(nq, dtype=torch.float64).index_add_(0, chunk, seg)
    qcnt = torch.zeros(nq, dtype=torch.float64).index_add_(0, chunk, nz.double())
    q = torch.where(nz, (qsum / qcnt.clamp(min=1))[chunk], 0.0)
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float((p[m] * (p[m] / q[m].clamp(min=1e-12)).log()).sum())


def test_kl_prefix_sum_formula_matches_reference():
    from hf_compress.quant.observers import _kl_windows

    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, 50, (300,), generator=g).double()
    hist[torch.randint(0, 300, (60,), generator=g)] = 0  # empty bins, including some window edges
    nq = 16
    windows = [(0, 300), (0, 16), (5, 40), (17, 200), (100, 299), (3, 19), (250, 300)]
    windows += [
        (int(x), int(x) + int(w))
        for x, w in zip(
            torch.randint(0, 100, (20,), generator=g), torch.randint(16, 200, (20,), generator=g), strict=True
        )
    ]
    a = torch.tensor([w[0] for w in windows])
    b = torch.tensor([w[1] for w in windows])
    got = _kl_windows(hist, a, b, nq)
    for i, (wa, wb) in enumerate(windows):
        assert got[i].item() == pytest.approx(_kl_reference(hist, wa, wb, nq), rel=1e-9, abs=1e-9), (wa, wb)


@pytest.mark.parametrize("n", [5, 100, 4099, 300_000])
@pytest.mark.parametrize("q", [0.0001, 0.01, 0.1])
def test_tail_quantile_equals_torch_quantile(n, q):
    # The percentile observer takes the tails with topk (O(n)) instead of sorting everything; torch.quantile
    # rounds q to float32 before taking the rank, hence the small tolerance on large inputs.
    from hf_compress.quant.observers import _tail_quantile

    torch.manual_seed(n)
    x = torch.randn(3, n) * 3
    expected = torch.quantile(x.double(), torch.tensor([q, 1 - q], dtype=torch.float64), dim=1).float()
    torch.testing.assert_close(_tail_quantile(x, q, low=True), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_tail_quantile(x, 1 - q, low=False), expected[1], rtol=1e-5, atol=1e-5)
