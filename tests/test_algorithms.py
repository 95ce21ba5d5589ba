"""Per-layer algorithms against independent references: brute force, numpy formulas, the dense layer."""

import itertools

import numpy as np
import pytest
import torch

from slim_onnx.algorithms.gptq import gptq_quantize
from slim_onnx.algorithms.groups import dequantize
from slim_onnx.algorithms.layer import CompressionError, compress_layer
from slim_onnx.algorithms.lowrank import hessian_low_rank_factors, low_rank_factors, saliency, truncated_svd
from slim_onnx.algorithms.masks import magnitude_2of4_mask, wanda_2of4_mask
from slim_onnx.algorithms.quantizers import (
    histogram,
    quantization_mse,
    quantize_absmax,
    quantize_slim,
    slim_quant_clip,
)
from slim_onnx.algorithms.stats import LayerStatistics, StatisticsError
from slim_onnx.config import ConfigError, SlimConfig
from slim_onnx.packing import pack_layer


def correlated_inputs(n, k, outliers=0, seed=0):
    """Inputs dominated by k/4 latent directions plus noise: strongly correlated channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    if outliers:
        x[:, :outliers] *= 20
    return x


def stats_of(x):
    st = LayerStatistics(x.shape[1])
    st.update(x)
    return st


def weight(k, n, seed=1, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) / k**0.5
    if heavy:  # heavier tails, like trained weights
        w = w * torch.empty(k, n).exponential_(1.0, generator=g) ** 0.5  # seeded: the test must not depend on order
    return w


# ---- statistics ------------------------------------------------------------------------------------


def test_statistics_stream_equals_one_shot():
    x = correlated_inputs(300, 24).double()
    st = LayerStatistics(24)
    for chunk in torch.split(x, 37):
        st.update(chunk.float().numpy().reshape(1, -1, 24))  # numpy, with a batch dim
    assert st.count == 300
    # each batch summed in float32 (stats.py says why): float32 rounding of the float64 sums
    torch.testing.assert_close(st.channel_sq_mean, (x.float().double() ** 2).mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.channel_abs_mean, x.float().double().abs().mean(0), rtol=1e-6, atol=0)
    want = x.float().double().T @ x.float().double() / 300
    torch.testing.assert_close(st.hessian.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_statistics_errors_name_the_layer():
    st = LayerStatistics(8, name="blk.0.q")
    with pytest.raises(StatisticsError, match="blk.0.q: calibration input has width 7"):
        st.update(torch.ones(2, 7))
    with pytest.raises(StatisticsError, match="blk.0.q: calibration input holds NaN"):
        st.update(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(StatisticsError, match="no calibration data"):
        st.channel_sq_mean


def test_output_error_matches_direct_computation():
    x = correlated_inputs(200, 16)
    w, w2 = weight(16, 8), weight(16, 8, seed=5)
    direct = torch.linalg.norm(x.double() @ (w - w2).double()) / torch.linalg.norm(x.double() @ w.double())
    assert stats_of(x).output_error(w, w2) == pytest.approx(float(direct), rel=1e-6)


# ---- quantizers --------------------------------------------------------------------------------------


def test_slim_quant_clip_matches_brute_force_of_its_objective():
    w = weight(256, 128, heavy=True)
    centres, counts = histogram(w)
    alpha = slim_quant_clip(w, bits=4)
    amax = float(w.abs().max())
    grid = torch.linspace(amax * 1e-3, amax, 20000)
    brute = quantization_mse(centres, counts, grid, 4)
    ours = quantization_mse(centres, counts, torch.tensor([alpha]), 4)
    assert float(ours[0]) <= float(brute.min()) * (1 + 1e-3)


def test_slim_quant_objective_is_the_applied_quantizer():
    """The histogram objective predicts the MSE that quantize_slim really produces."""
    w = weight(512, 64, heavy=True)
    q, scales = quantize_slim(w, group_size=512)
    real = float(((w - dequantize(q, scales, 512)) ** 2).sum())
    centres, counts = histogram(w)
    alpha = float(scales[0, 0]) * 7
    modelled = float(quantization_mse(centres, counts, torch.tensor([alpha]), 4)[0])
    assert modelled == pytest.approx(real, rel=0.05)


def test_slim_quant_beats_absmax_on_heavy_tails():
    w = weight(512, 64, heavy=True)
    err_slim = ((w - dequantize(*quantize_slim(w, 512), 512)) ** 2).sum()
    err_absmax = ((w - dequantize(*quantize_absmax(w, 512), 512)) ** 2).sum()
    assert err_slim < 0.8 * err_absmax


def test_group_slim_quant_picks_the_best_clip_of_each_group():
    w = weight(64, 6, heavy=True)
    q, scales = quantize_slim(w, group_size=16, per_group=True)
    for g in range(4):
        for n in range(6):
            vals = w[16 * g : 16 * g + 16, n]
            chosen = ((vals - q[16 * g : 16 * g + 16, n].float() * scales[g, n].float()) ** 2).sum()
            for ratio in torch.linspace(0.30, 1.0, 36):
                s = (vals.abs().max() * ratio / 7).half().float()
                alt = ((vals - torch.clamp(torch.round(vals / s), -8, 7) * s) ** 2).sum()
                assert chosen <= alt * (1 + 1e-5)


@pytest.mark.parametrize("quantize", [quantize_absmax, quantize_slim])
def test_eight_bit_quantizers(quantize):
    w = weight(256, 16, heavy=True)
    q8, s8 = quantize(w, 128, 8)
    q4, s4 = quantize(w, 128, 4)
    assert q8.min() >= -128 and q8.max() <= 127 and q8.abs().max() > 100
    assert ((w - dequantize(q8, s8, 128)) ** 2).sum() < 0.02 * ((w - dequantize(q4, s4, 128)) ** 2).sum()


def test_absmax_matches_numpy_formula():
    w = weight(40, 5)  # K not a multiple of the group: a short last group
    q, scales = quantize_absmax(w, 16)
    wn = w.numpy()
    for g in range(3):
        rows = wn[16 * g : 16 * g + 16]
        s = (np.abs(rows).max(0) / 7).astype(np.float16)
        np.testing.assert_array_equal(scales[g].numpy(), s)
        np.testing.assert_array_equal(q[16 * g : 16 * g + 16].numpy(), np.clip(np.rint(rows / s.astype(np.float32)), -8, 7))


# ---- masks -------------------------------------------------------------------------------------------


def numpy_2of4(scores):
    k, n = scores.shape
    mask = np.zeros((k, n), dtype=bool)
    for col in range(n):
        for g in range(0, k, 4):
            best = sorted(range(4), key=lambda i: (-scores[g + i, col], i))[:2]
            mask[[g + b for b in best], col] = True
    return mask


def test_magnitude_and_wanda_masks_match_numpy_formula():
    w = weight(32, 7)
    s = torch.rand(32) * 3
    np.testing.assert_array_equal(magnitude_2of4_mask(w).numpy(), numpy_2of4(np.abs(w.numpy())))
    np.testing.assert_array_equal(
        wanda_2of4_mask(w, s).numpy(), numpy_2of4(np.abs(w.numpy()) * np.sqrt(s.numpy())[:, None])
    )


@pytest.mark.parametrize("pruning,quantizer", [("magnitude", "absmax"), ("wanda", "slim"), ("sparsegpt", "gptq")])
def test_every_mask_keeps_exactly_two_of_four(pruning, quantizer):
    x = correlated_inputs(500, 64)
    w = weight(64, 16)
    layer = compress_layer(w, stats_of(x), SlimConfig(pruning=pruning, quantizer=quantizer, rank=0))
    q = pack_layer(layer).quantized_weight()
    kept = (q.reshape(16, 4, 16) != 0).sum(axis=1)
    assert kept.max() <= 2
    assert (kept == 2).mean() > 0.9  # zeros only where a kept weight rounded to 0


# ---- GPTQ / SparseGPT -----------------------------------------------------------------------------------


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    x = correlated_inputs(2000, 96)
    st = stats_of(x)
    w = weight(96, 32)
    q, s, _ = gptq_quantize(w, st.hessian, 32)
    rtn = dequantize(*quantize_absmax(w, 32), 32)
    assert st.output_error(w, dequantize(q, s, 32)) < 0.8 * st.output_error(w, rtn)


def test_sparsegpt_gptq_beats_magnitude_absmax():
    x = correlated_inputs(2000, 128)
    st = stats_of(x)
    w = weight(128, 48)
    sgpt = compress_layer(w, st, SlimConfig(pruning="sparsegpt", quantizer="gptq", rank=0))
    mag = compress_layer(w, st, SlimConfig(pruning="magnitude", quantizer="absmax", rank=0))
    assert sgpt.report["output_error"] < 0.8 * mag.report["output_error"]


def test_gptq_zeroes_dead_channels():
    x = correlated_inputs(500, 32)
    x[:, 5] = 0
    q, _, _ = gptq_quantize(weight(32, 8), stats_of(x).hessian, 32)
    assert (q[5] == 0).all()


# ---- low-rank adapters -------------------------------------------------------------------------------------


def test_saliency_adapters_beat_naive_on_outlier_channels():
    x = correlated_inputs(2000, 128, outliers=6)
    st = stats_of(x)
    w = weight(128, 96)
    sal = compress_layer(w, st, SlimConfig.paper(rank=16, lowrank="saliency", adapter_format="float16"))
    naive = compress_layer(w, st, SlimConfig.paper(rank=16, lowrank="naive", adapter_format="float16"))
    assert sal.report["activation_weighted_error"] < 0.9 * naive.report["activation_weighted_error"]
    assert sal.report["output_error"] < naive.report["output_error"]


def test_error_falls_as_rank_grows():
    x = correlated_inputs(1000, 96, outliers=3)
    st = stats_of(x)
    w = weight(96, 64)
    errors = [compress_layer(w, st, SlimConfig(rank=r, adapter_format="float16")).report["output_error"] for r in (0, 8, 16, 32, 64)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def test_saliency_solution_is_optimal_against_brute_force_alternatives():
    """diag(x)(E - L R) is minimal: no random rank-r factorisation does better (Eckart-Young)."""
    g = torch.Generator().manual_seed(3)
    e = torch.randn(40, 30, generator=g)
    x = torch.rand(40, generator=g) + 0.1
    l, r = low_rank_factors(e, 5, x, method="full")
    best = torch.linalg.norm(x[:, None] * (e - l @ r))
    for _ in range(50):
        l2, r2 = torch.randn(40, 5, generator=g), torch.randn(5, 30, generator=g)
        # the best R for a given L, by least squares: still no better than the SVD optimum
        r2 = torch.linalg.lstsq(x[:, None] * l2, x[:, None] * e).solution
        assert torch.linalg.norm(x[:, None] * (e - l2 @ r2)) >= best - 1e-4


def test_hessian_adapters_minimise_the_output_error():
    """tr((E - L R)^T H (E - L R)) at the Hessian solution is below any least-squares-completed alternative."""
    x = correlated_inputs(800, 48)
    h = stats_of(x).hessian.double()
    g = torch.Generator().manual_seed(4)
    e = torch.randn(48, 20, generator=g)
    l, r = hessian_low_rank_factors(e, 4, h, damp=0.0, method="full")

    def out_err(d):
        return float(torch.einsum("kn,kj,jn->", d.double(), h, d.double()))

    best = out_err(e - l @ r)
    xs = x.double()
    for _ in range(30):
        l2 = torch.randn(48, 4, generator=g).double()
        r2 = torch.linalg.lstsq(xs @ l2, xs @ e.double()).solution
        assert out_err(e - (l2 @ r2).float()) >= best * (1 - 1e-4)


def test_hessian_adapters_beat_saliency_on_correlated_inputs():
    x = correlated_inputs(2000, 128, outliers=4)
    st = stats_of(x)
    w = weight(128, 96)
    hess = compress_layer(w, st, SlimConfig(rank=16, lowrank="hessian", adapter_format="float16"))
    sal = compress_layer(w, st, SlimConfig(rank=16, lowrank="saliency", adapter_format="float16"))
    assert hess.report["output_error"] < sal.report["output_error"]


def test_randomized_svd_is_close_to_full():
    w = weight(600, 400, heavy=True) + 0.05 * torch.randn(600, 8) @ torch.randn(8, 400)
    full = truncated_svd(w, 40, "full")
    fast = truncated_svd(w, 40, "randomized")
    err = [torch.linalg.norm(w - u @ torch.diag(s) @ v.T) for u, s, v in (full, fast)]
    assert err[1] <= err[0] * 1.02
    torch.testing.assert_close(fast[1][:5], full[1][:5], rtol=2e-2, atol=1e-3)


def test_saliency_shift_keeps_silent_channels_positive():
    x = saliency(torch.tensor([0.0, 4.0, 1.0]))
    torch.testing.assert_close(x, torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64).sqrt())
    x = saliency(torch.tensor([0.0, 4.0, 1.0]), kind="mean_abs")
    torch.testing.assert_close(x, torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))


def test_mask_on_quantized_weights_is_the_papers_order():
    """magnitude + AbsMax with mask_on='quantized': W_c = M * Q(W), M from |Q(W)|, Q fitted on dense W."""
    w = weight(32, 6)
    layer = compress_layer(w, None, SlimConfig(pruning="magnitude", quantizer="absmax", group_size=16, rank=0,
                                               mask_on="quantized"))
    wn = w.numpy()
    expected = np.zeros_like(wn)
    for g in range(2):
        rows = wn[16 * g : 16 * g + 16]
        s = (np.abs(rows).max(0) / 7).astype(np.float16).astype(np.float32)
        expected[16 * g : 16 * g + 16] = np.clip(np.rint(rows / s), -8, 7) * s
    expected *= numpy_2of4(np.abs(expected))
    np.testing.assert_allclose(pack_layer(layer).dense_weight(), expected, atol=1e-6)


# ---- the packed result -------------------------------------------------------------------------------------


def test_packed_layer_is_the_dense_matrix_the_algorithm_meant():
    """magnitude + AbsMax + naive float16 adapters, recomputed with numpy from scratch."""
    w = weight(64, 24)
    layer = compress_layer(w, None, SlimConfig(pruning="magnitude", quantizer="absmax", group_size=32, rank=8,
                                               lowrank="naive", adapter_format="float16", svd="full"))
    wn = w.numpy().astype(np.float64)
    masked = wn * numpy_2of4(np.abs(wn))
    expected_c = np.zeros_like(wn)
    for g in range(2):
        rows = masked[32 * g : 32 * g + 32]
        s = (np.abs(rows).max(0) / 7).astype(np.float16).astype(np.float64)
        expected_c[32 * g : 32 * g + 32] = np.clip(np.rint(rows / s), -8, 7) * s
    u, sv, vt = np.linalg.svd(wn - expected_c)
    expected = expected_c + (u[:, :8] * sv[:8]) @ vt[:8]
    np.testing.assert_allclose(pack_layer(layer).dense_weight(), expected_c, atol=1e-6)
    np.testing.assert_allclose(layer.effective_weight(), expected, atol=2e-3)  # float16 adapters


def test_report_sizes_and_method():
    x = correlated_inputs(300, 128)
    layer = compress_layer(weight(128, 256), stats_of(x), SlimConfig(), name="mlp.up")
    rep = layer.report
    assert rep["layer"] == "mlp.up" and rep["method"]["rank"] == 16 and rep["method"]["adapter_format"] == "int4"
    assert rep["bytes_float16"] == 128 * 256 * 2 and "bytes_packed" not in rep  # the packer adds it
    assert 0 < rep["output_error"] < 1


# ---- configuration and bad input -----------------------------------------------------------------------------


def test_config_rank_and_validation():
    assert SlimConfig().resolve_rank(576, 1536) == 64  # ceil(57.6) = 58 -> multiple of 8
    assert SlimConfig(rank=0.1, rank_multiple=1).resolve_rank(4096, 4096) == 410
    assert SlimConfig(rank=12).resolve_rank(64, 64) == 12
    assert SlimConfig(rank=64).resolve_rank(64, 32) == 32  # an absolute rank is capped at the layer's full rank
    assert SlimConfig(rank=0).resolve_rank(64, 64) == 0
    with pytest.raises(ConfigError, match="pruning='sparsegpt' prunes inside the GPTQ pass"):
        SlimConfig(pruning="sparsegpt", quantizer="slim")
    with pytest.raises(ConfigError, match="quantizer='rtn': expected one of"):
        SlimConfig(quantizer="rtn")
    paper = SlimConfig.paper()
    assert (paper.pruning, paper.quantizer, paper.lowrank) == ("wanda", "slim", "saliency")


@pytest.mark.parametrize(
    "w,stats,config,message",
    [
        (torch.ones(4, 4, 4), None, SlimConfig(rank=0, pruning="magnitude", quantizer="absmax"), "expected a 2-D"),
        (torch.ones(10, 8), None, SlimConfig(rank=0, pruning="magnitude", quantizer="absmax"), "K divisible by 4, got K=10"),
        (torch.full((8, 8), float("nan")), None, SlimConfig(rank=0, pruning="magnitude", quantizer="absmax"), "NaN or Inf"),
        (torch.ones(8, 8), None, SlimConfig(rank=0), "needs calibration statistics"),
    ],
)
def test_bad_input_names_the_layer(w, stats, config, message):
    with pytest.raises(CompressionError, match=f"layer attn.q: .*{message}"):
        compress_layer(w, stats, config, name="attn.q")


@pytest.mark.parametrize("hessian", [True, False])
def test_nan_statistics_are_rejected(hessian):
    st = LayerStatistics(8, hessian=hessian)
    st.update(torch.ones(4, 8))
    (st.xtx if hessian else st.sq_sum)[3] = float("inf")
    with pytest.raises(CompressionError, match="layer v: calibration statistics hold NaN or Inf"):
        compress_layer(torch.ones(8, 8), st, SlimConfig(rank=0), name="v")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = correlated_inputs(500, 64)
    w = weight(64, 32)
    cpu = compress_layer(w, stats_of(x), SlimConfig(rank=8, svd="full"))
    gpu = compress_layer(w, stats_of(x), SlimConfig(rank=8, svd="full", device="cuda"))
    np.testing.assert_allclose(cpu.effective_weight(), gpu.effective_weight(), atol=1e-2)


@pytest.mark.parametrize("lowrank", ["hessian", "saliency"])
def test_column_chunks_give_the_same_layer(monkeypatch, lowrank):
    """GPTQ/SparseGPT, the adapters' weighting and the error reports act on each output column alone,
    so running them over chunks of columns (what bounds their memory on a 4096 x 128256 lm_head)
    gives the layer that one pass over all columns gives."""
    from slim_onnx.algorithms import gptq, layer, lowrank as lowrank_module

    w, st = weight(64, 40), stats_of(correlated_inputs(500, 64))
    config = SlimConfig(rank=8, lowrank=lowrank, svd="full")
    whole = compress_layer(w, st, config)
    for module in (gptq, layer, lowrank_module):
        monkeypatch.setattr(module, "COLUMN_CHUNK", 16)  # 16 + 16 + 8 columns
    chunked = compress_layer(w, st, config)
    for a, b in [(whole.q, chunked.q), (whole.scales, chunked.scales), (whole.mask, chunked.mask)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(whole.effective_weight(), chunked.effective_weight(), rtol=1e-4, atol=1e-5)
    for key in ("weight_error", "output_error", "activation_weighted_error"):
        assert chunked.report[key] == pytest.approx(whole.report[key], rel=1e-4)
