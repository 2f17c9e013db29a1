"""Precisions: what each is refused where, FP8 by emulation (the GPU's operands multiplied in
fp32), the accuracy gate against strict fp32, and static batches that never return padding.

The gate test runs Clay with the large model's shapes (random weights, seeded) on real
imagery (Landsat 7 over Olinda), as the issue that asked for FP8 specifies."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from tests.helpers import olinda_chips
from xclay.devices import ComputePrecision, resolve_precision
from xclay.errors import DeviceError, ModelError
from xclay.models.agreement import GATES, agreement
from xclay.models.clay import ClayV15, PreparedClay
from xclay.models.clay_encoder import ClayEncoder
from xclay.models.fp8 import E4M3_MAX, FP8Linear, convert_linears, quantize
from xclay.protocols import ChipBatch, InputSpec

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- resolving


def test_gpu_precisions_are_refused_on_a_cpu_with_what_to_use() -> None:
    with pytest.raises(DeviceError, match=r"tf32.*on a CPU use 'fp32'"):
        resolve_precision("tf32", CPU, "bf16")
    with pytest.raises(DeviceError, match=r"FP8 tensor cores.*on a CPU use 'bf16'"):
        resolve_precision("fp8", CPU, "bf16")
    with pytest.raises(DeviceError, match="precision must be one of"):
        resolve_precision("fp16", CPU, "bf16")  # type: ignore[arg-type]
    assert resolve_precision("auto", CPU, "fp32").name == "fp32"
    assert resolve_precision("bf16", CPU, "fp32").dtype == torch.bfloat16
    assert resolve_precision("fp32", CPU, "bf16").dtype == torch.float32


def test_the_cli_and_specs_take_the_same_precisions(tmp_path: Path) -> None:
    from xclay.run import RunSpec, SpecError

    spec = {"input": {"datacube": "c.zarr"}, "outputs": {"dir": str(tmp_path)}}
    for name in ("tf32", "fp8", "bf16"):
        got = RunSpec.from_dict({**spec, "compute": {"precision": name}}).compute.precision
        assert got == name
    with pytest.raises(SpecError, match=r"compute\.precision"):
        RunSpec.from_dict({**spec, "compute": {"precision": "fp16"}})


# --------------------------------------------------------------------------- FP8


def test_quantize_maps_each_row_onto_e4m3() -> None:
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different size
    q, scale = quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((64,), E4M3_MAX))
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself (relative), or tiny.
    err = (back - x).abs() / x.abs().clamp_min(scale * 2**-6)
    assert err.max() <= 2**-4 + 1e-6
    zero_q, zero_scale = quantize(torch.zeros(2, 8))
    assert (zero_scale == 1).all() and (zero_q.float() == 0).all()
    _, per_tensor = quantize(x, "tensor")
    assert per_tensor.shape == (1, 1)


def test_emulated_fp8_linear_is_the_product_of_the_quantised_operands() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    x = torch.randn(4, 10, 128)
    fp8 = FP8Linear(linear, emulate=True)
    got = fp8(x)
    assert got.dtype == torch.bfloat16 and got.shape == (4, 10, 96)
    qx, sx = quantize(x.reshape(-1, 128))
    qw, sw = quantize(linear.weight.detach())
    want = (qx.double() @ qw.double().T) * sx.double() * sw.double().T + linear.bias.double()
    torch.testing.assert_close(got.double().reshape(-1, 96), want, rtol=1e-2, atol=1e-2)
    exact = linear(x).double()
    rel = (got.double() - exact).norm() / exact.norm()
    assert rel < 0.05  # FP8 is close to the fp32 layer, not equal to it
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    assert convert_linears(model, scaling="row", emulate=True) == 2
    assert isinstance(model[0], FP8Linear) and isinstance(model[2], FP8Linear)


def test_agreement_figures() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 16))
    same = agreement(a, a.copy(), "fp8")
    assert same.cosine_min == pytest.approx(1) and same.knn10_recall == 1 and not same.failures
    noisy = agreement(a, a + rng.normal(scale=2.0, size=a.shape), "fp8")
    assert noisy.cosine_min < 0.995 and noisy.knn10_recall is not None
    assert noisy.knn10_recall < 0.95 and len(noisy.failures) == 2
    assert agreement(a[:5], a[:5], "bf16").knn10_recall is None  # too few chips for 10-NN


# --------------------------------------------------------------------------- Clay


def _spec(chip: int = 32, batch: int = 0) -> InputSpec:
    waves = (0.49, 0.56, 0.66, 0.84, 1.61, 2.2)
    return InputSpec(None, tuple("abcdef"), waves, 10.0, 0, "uint16", chip, batch)


def _batch(n: int = 24, chip: int = 32, seed: int = 0) -> ChipBatch:
    g = torch.Generator().manual_seed(seed)
    # each chip its own spectrum plus texture, as land covers differ: neighbours mean something
    spectra = 500 + 3000 * torch.rand(n, 6, 1, 1, generator=g)
    texture = 400 * torch.rand(n, 6, chip, chip, generator=g)
    return ChipBatch(
        pixels=(spectra + texture).to(torch.uint16),
        valid=torch.ones(n, chip, chip, dtype=torch.bool),
        lonlat=torch.tensor([[-60.5 + 0.1 * i, -3.2] for i in range(n)], dtype=torch.float64),
        time=np.array(["2024-07-02"] * n, dtype="datetime64[ns]"),
    )


def _clay(
    precision: str, batch_size: int = 0, device: torch.device = CPU, **options: object
) -> PreparedClay:
    """Clay tiny (seeded weights) prepared in ``precision`` on ``device`` as a run prepares
    it (fp8 emulated on a CPU), 24 chips checked."""
    torch.manual_seed(7)
    enc = ClayV15(
        ClayEncoder.from_size("tiny").eval(),
        size="tiny",
        normalization=dict.fromkeys("abcdef", (1500.0, 900.0)),
        precision_check=24,
        **options,  # type: ignore[arg-type]
    )
    return enc.prepare(
        _spec(batch=batch_size),
        lambda n, s: _batch(n),
        device=device,
        precision=resolve_precision(precision, device, "bf16")  # type: ignore[arg-type]
        if device.type == "cuda"
        else ComputePrecision(precision, emulated=precision == "fp8"),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_a_fast_precision_is_checked_against_fp32_and_recorded(precision: str) -> None:
    strict = _clay("fp32").encode(_batch(seed=3)).numpy()
    fast = _clay(precision)
    params = fast.card.params
    check = params["precision_check"]
    assert params["precision"] == precision and check["chips"] == 24
    assert check["passes"] and check["gate"] == GATES[precision]
    assert check["cosine_min"] >= GATES[precision]["cosine_min"]
    if precision == "fp8":
        assert params["fp8_scaling"] == "per row" and params["fp8_emulated"] is True
        assert isinstance(fast.loaded.model.transformer.layers[0][0].to_qkv, FP8Linear)  # type: ignore[index]
    else:
        assert fast.loaded.model.transformer.layers[0][0].to_qkv.weight.dtype == torch.bfloat16  # type: ignore[index]
        assert fast.loaded.model.transformer.norm.weight.dtype == torch.float32  # norms stay fp32
    got = fast.encode(_batch(seed=3)).numpy()
    cos = (got * strict).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(strict, axis=1)
    assert cos.min() >= GATES[precision]["cosine_min"]


def test_fp8_that_misses_its_gate_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(GATES, "fp8", {"cosine_min": 1.0, "knn10_recall": 1.0})  # unreachable
    with pytest.raises(ModelError, match=r"fp8 changes these embeddings.*Use precision='bf16'"):
        _clay("fp8")


def test_a_model_turned_into_bf16_is_not_run_in_fp32_again() -> None:
    enc = _clay("bf16")
    again = ClayV15(
        enc.loaded.model, size="tiny", normalization=dict.fromkeys("abcdef", (1500.0, 900.0))
    )
    with pytest.raises(ModelError, match=r"turned into bf16.*load it again"):
        again.prepare(
            _spec(), lambda n, s: _batch(n), device=CPU, precision=ComputePrecision("fp32")
        )


def test_static_batches_return_only_the_chips_given() -> None:
    padded = _clay("fp32", batch_size=16, static_batch=True)
    plain = _clay("fp32", static_batch=False)
    batch = _batch(5, seed=4)
    got = padded.encode(batch)
    assert got.shape == (5, 192)
    torch.testing.assert_close(got, plain.encode(batch), rtol=1e-5, atol=1e-5)
    assert padded.card.params["compiled"] is False and padded.card.params["attention"] == "default"


def test_the_gate_on_real_imagery_with_clay_large_shapes(olinda_tif: Path) -> None:
    """The issue's gate: Clay with the large model's shapes (random weights, seed 0) on the
    25 Landsat 7 chips of 64 px over Olinda, bf16 and FP8 (emulated: the operands the GPU
    multiplies) against strict fp32."""
    pytest.importorskip("rioxarray", reason="needs xclay[io]")
    chips, spec = olinda_chips(olinda_tif, chip=64)
    torch.manual_seed(0)
    weights = ClayEncoder.from_size("large").eval()  # initialised once: 300 M parameters
    vectors = {}
    for precision in ("fp32", "bf16", "fp8"):
        model = copy.deepcopy(weights)  # each precision prepares a model of its own
        enc = ClayV15(model, size="large", normalization="measured", precision_check=0)
        ready = enc.prepare(
            spec,
            lambda n, s: chips,
            device=CPU,
            precision=ComputePrecision(precision, emulated=precision == "fp8"),
        )
        vectors[precision] = ready.encode(chips).numpy()
    for precision in ("bf16", "fp8"):
        result = agreement(vectors["fp32"], vectors[precision], precision)
        assert result.chips == 25
        assert not result.failures, (precision, result)


# torch's inductor imports its own deprecated jit helpers; that is torch's business
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_encoder_compiles_once_and_replays_for_a_short_last_batch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """torch.compile on a CPU (inductor's C++ backend): the warm-up compiles the static
    batch's graph; a full batch and a short last one replay it (a recompile is an error
    here), and give the eager model's embeddings."""
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    compiled = _clay("fp32", batch_size=8, compile=True)
    eager = _clay("fp32", compile=False)
    assert compiled.card.params["compiled"] is True
    assert compiled.card.params["compile_seconds"] > 0
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for n, seed in ((8, 5), (3, 6)):
        batch = _batch(n, seed=seed)
        got = compiled.encode(batch)
        assert got.shape == (n, 192)
        torch.testing.assert_close(got, eager.encode(batch), rtol=1e-4, atol=1e-4)
    assert any((tmp_path / "inductor").iterdir())  # compiled code kept for the next run


# --------------------------------------------------------------------------- on a GPU


def _fp8_gpu() -> torch.device:
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores")
    return device


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 37])  # 37: padded to the kernels' tile of 16 rows
def test_fp8_tensor_cores_compute_what_the_emulation_computes(rows: int) -> None:
    device = _fp8_gpu()
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192).to(device)
    x = torch.randn(rows, 256, device=device)
    emulated = FP8Linear(linear, emulate=True)(x).float()
    for scaling in ("row", "tensor"):
        gpu = FP8Linear(linear, scaling=scaling, emulate=False)
        if scaling == "row":
            torch.testing.assert_close(gpu(x).float(), emulated, rtol=1e-2, atol=2e-2)
        assert gpu(x).shape == (rows, 192)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_the_fast_path_on_cuda_keeps_the_embeddings(precision: str) -> None:
    """Defaults on CUDA: compiled, static batches, a measured attention kernel, the check
    against strict fp32 passed and recorded; a short last batch returns only its chips."""
    device = torch.device("cuda")
    if precision == "fp8":
        _fp8_gpu()
    strict = _clay("fp32").encode(_batch(5, seed=8)).numpy()  # on the CPU
    enc = _clay(precision, batch_size=16, device=device)
    params = enc.card.params
    assert params["compiled"] is True and params["compile_seconds"] > 0
    assert params["attention"] in ("flash", "cudnn", "efficient")
    assert params["precision_check"]["passes"]
    got = enc.encode(_batch(5, seed=8)).cpu().numpy()
    assert got.shape == (5, 192)
    cos = (got * strict).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(strict, axis=1)
    assert cos.min() >= GATES[precision]["cosine_min"]


def test_a_worker_rebuilt_from_the_card_keeps_the_drivers_check(tmp_path: Path) -> None:
    """A run's workers rebuild the encoder from the driver's card: they record the
    driver's accuracy check instead of embedding the check chips again in fp32, and
    check afresh only a precision the card did not check."""
    from xclay.testing import write_clay_checkpoint

    checkpoint = write_clay_checkpoint(tmp_path / "clay.ckpt", size="tiny", seed=7)
    drawn: list[tuple[int, int]] = []

    def sample(n: int, seed: int) -> ChipBatch:
        drawn.append((n, seed))
        return _batch(n)

    def prepared(enc: ClayV15, precision: Literal["bf16", "fp8"]) -> PreparedClay:
        compute = ComputePrecision(precision, emulated=precision == "fp8")
        return enc.prepare(_spec(), sample, device=CPU, precision=compute)

    norm = dict.fromkeys("abcdef", (1500.0, 900.0))
    driver = prepared(ClayV15.from_checkpoint(checkpoint, normalization=norm), "bf16")
    assert drawn == [(32, 0)]  # the driver's check chips
    worker = prepared(ClayV15.from_card(driver.card, checkpoint=checkpoint), "bf16")
    assert drawn == [(32, 0)]  # none drawn again
    assert worker.card.params["precision_check"] == driver.card.params["precision_check"]
    batch = _batch(5, seed=9)
    torch.testing.assert_close(worker.encode(batch), driver.encode(batch))
    other = prepared(ClayV15.from_card(driver.card, checkpoint=checkpoint), "fp8")
    assert drawn == [(32, 0), (32, 0)]  # another precision: checked afresh
    assert other.card.params["precision_check"]["precision"] == "fp8"
