"""The embedding loop and its output Dataset."""

from __future__ import annotations

import inspect
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import xclay
from xclay.accessor import ClayDataArrayAccessor, ClayDatasetAccessor
from xclay.errors import ConfigError, DatacubeError, DeviceError, ModelError

from .helpers import random_cube


def _embed(cube: xr.Dataset, **kw: Any) -> xr.Dataset:
    options: dict[str, Any] = {"chip_size": 64, "batch_size": 4, "progress": False}
    options.update(kw)
    model = options.pop("model", None) or xclay.models.get_model(
        "rcf", num_filters=16, sample_chips=6
    )
    return xclay.embed(cube, model=model, **options)


def test_embeddings_dataset_layout(demo_cube_256: xr.Dataset) -> None:
    emb = _embed(demo_cube_256)
    assert emb["embedding"].dims == ("time", "chip_y", "chip_x", "feature")
    assert emb["embedding"].shape == (1, 4, 4, 32)
    assert emb["embedding"].dtype == np.float32
    for name in ("nodata_fraction", "cloud_fraction", "embedded"):
        assert emb[name].dims == ("time", "chip_y", "chip_x")
    assert emb.attrs["convention"] == "xclay-embeddings/1"
    assert emb.attrs["model"]["name"] == "rcf"
    assert emb.attrs["config"]["grid"] == {"chip_size": 64, "stride": None, "edges": "drop"}
    assert emb.attrs["datacube"]["platform"] == "sentinel-2-l2a"
    assert emb.attrs["run"]["chips_total"] == 16
    # The chip grid is a raster: pixel size = chip size x gsd, centred on chip centres.
    gb = xclay.datacube.datacube_geobox(demo_cube_256)
    assert emb["chip_x"].values[0] == pytest.approx(gb.affine.c + 32 * 10)
    assert np.diff(emb["chip_x"].values) == pytest.approx(640)
    assert float(emb["spatial_ref"].attrs["GeoTransform"].split()[1]) == 640
    assert emb["chip_id"].values[0, 0].startswith("EPSG32720_64px_10m_")
    assert np.isfinite(emb["embedding"].values[emb["embedded"].values]).all()


def test_chips_over_max_nodata_are_skipped_and_counted() -> None:
    cube = random_cube((1, 3, 128, 128))
    cube["pixels"].values[0, :, :64, :64] = 0  # chip (0, 0): all nodata
    cube["pixels"].values[0, :, 64:128, 64:104] = 0  # chip (1, 1): 62.5 % nodata
    emb = _embed(cube, quality={"max_nodata": 0.5})
    embedded = emb["embedded"].values[0]
    assert embedded.tolist() == [[False, True], [True, False]]
    assert np.isnan(emb["embedding"].values[0, 0, 0]).all()
    assert emb["nodata_fraction"].values[0, 1, 1] == pytest.approx(0.625)
    assert emb.attrs["run"] == {
        "chips_total": 4,
        "chips_embedded": 2,
        "chips_skipped_nodata": 2,
        "chips_skipped_cloud": 0,
        "chips_skipped_cloud_shadow": 0,
        "chips_skipped_haze": 0,
        "chips_skipped_snow": 0,
        "chips_skipped_clear": 0,
        "chips_failed": 0,
    }
    lenient = _embed(cube, quality={"max_nodata": 0.9})
    assert lenient["embedded"].values[0].tolist() == [
        [False, True],
        [True, True],
    ]  # all-nodata never


def test_lazily_opened_cube_gives_identical_embeddings(
    tmp_path: Path, demo_cube_256: xr.Dataset
) -> None:
    path = xclay.write_datacube(demo_cube_256, tmp_path / "c.zarr", chip_size=64)
    on_disk = _embed(xclay.open_datacube(path))
    in_memory = _embed(demo_cube_256)
    # Read straight from the chunk files, or through xarray: the same everything else.
    assert on_disk.attrs.pop("data_path")["reader"].startswith("chunk files")
    assert in_memory.attrs.pop("data_path")["reader"] == "xarray windows"
    xr.testing.assert_identical(on_disk, in_memory)


def test_prefetch_does_not_change_results(demo_cube_256: xr.Dataset) -> None:
    without, ahead = _embed(demo_cube_256, prefetch=0), _embed(demo_cube_256, prefetch=3)
    xr.testing.assert_equal(without, ahead)  # same values, coords and order
    assert without.attrs["model"] == ahead.attrs["model"]
    assert (without.attrs["config"]["prefetch"], ahead.attrs["config"]["prefetch"]) == (0, 3)


def test_memory_is_bounded_by_the_batch_not_the_cube(tmp_path: Path) -> None:
    from xclay.models.rcf import RCFEncoder

    fitted = xclay.models.get_model("rcf", num_filters=8, sample_chips=2)
    _embed(random_cube((1, 10, 128, 128)), model=fitted)
    peaks = {}
    for n in (256, 1024):  # 1.3 MiB and 20 MiB of pixels on disk
        path = xclay.write_datacube(
            random_cube((1, 10, n, n), seed=n), tmp_path / f"c{n}.zarr", chip_size=64
        )
        lazy = xclay.open_datacube(path)
        model = RCFEncoder.from_card(fitted.card)  # fitting is a fixed cost; measure the loop
        tracemalloc.start()
        try:
            emb = xclay.embed(
                lazy, model=model, chip_size=64, batch_size=2, prefetch=1, progress=False
            )
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert emb.attrs["run"]["chips_embedded"] == (n // 64) ** 2
    # A few batch buffers and one chunk at a time: a cube 16x larger costs (almost) nothing more.
    assert peaks[1024] < 2 * 2**20, peaks
    assert peaks[1024] - peaks[256] < 2**20, peaks


def test_edges_pad_covers_every_pixel(demo_cube_256: xr.Dataset) -> None:
    from xclay.models.rcf import RCFEncoder

    cube = demo_cube_256.isel(y=slice(0, 200), x=slice(0, 230))
    drop = _embed(cube, edges="drop")
    pad = _embed(cube, edges="pad", model=RCFEncoder.from_card(drop.attrs["model"]))
    assert drop["embedding"].shape[1:3] == (3, 3)
    assert pad["embedding"].shape[1:3] == (4, 4)
    # The last padded row of chips (192..256) has 8 of 64 rows inside the raster.
    assert (pad["nodata_fraction"].values[0, 3] >= 56 / 64).all()
    np.testing.assert_array_equal(drop["embedding"].values, pad["embedding"].values[:, :3, :3])


def test_stride_gives_overlapping_chips(demo_cube_256: xr.Dataset) -> None:
    emb = _embed(demo_cube_256, stride=32)
    assert emb["embedding"].shape[1:3] == (7, 7)
    assert np.diff(emb["chip_x"].values) == pytest.approx(320)
    assert emb["row_off"].values.tolist() == list(range(0, 193, 32))


def test_chip_centres_match_the_cube_grid(demo_cube_256: xr.Dataset) -> None:
    from pyproj import Transformer

    emb = _embed(demo_cube_256)
    x = demo_cube_256["x"].values
    y = demo_cube_256["y"].values
    # Centre of chip (i, j) lies between pixels 63 and 64 of its window.
    np.testing.assert_allclose(emb["chip_x"].values, (x[31::64] + x[32::64]) / 2)
    np.testing.assert_allclose(emb["chip_y"].values, (y[31::64] + y[32::64]) / 2)
    tr = Transformer.from_crs("EPSG:32720", "EPSG:4326", always_xy=True)
    lon, lat = tr.transform(*np.meshgrid(emb["chip_x"].values, emb["chip_y"].values))
    np.testing.assert_allclose(emb["lat"].values, lat, atol=1e-12)
    np.testing.assert_allclose(emb["lon"].values, lon, atol=1e-12)


def test_accessor_is_the_same_function(demo_cube_256: xr.Dataset) -> None:
    model_a = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    model_b = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    via_accessor = demo_cube_256.clay.embed(model=model_a, chip_size=64, progress=False)
    via_function = xclay.embed(demo_cube_256, model=model_b, chip_size=64, progress=False)
    via_accessor.attrs.pop("data_path"), via_function.attrs.pop("data_path")  # load-dependent
    xr.testing.assert_identical(via_accessor, via_function)
    via_dataarray = demo_cube_256["pixels"].clay.embed(
        model=xclay.models.get_model("rcf", num_filters=8, sample_chips=4),
        chip_size=64,
        progress=False,
    )
    np.testing.assert_array_equal(
        via_dataarray["embedding"].values, via_function["embedding"].values
    )


@pytest.mark.parametrize(
    ("accessor", "name"),
    [
        (ClayDatasetAccessor, "embed"),
        (ClayDataArrayAccessor, "embed"),
        (ClayDataArrayAccessor, "as_datacube"),
        (ClayDatasetAccessor, "write_datacube"),
        (ClayDatasetAccessor, "to_geoparquet"),
        (ClayDatasetAccessor, "similar"),
        (ClayDatasetAccessor, "plot_pca"),
        (ClayDatasetAccessor, "plot_similarity"),
        (ClayDatasetAccessor, "plot_true_colour"),
    ],
)
def test_accessor_methods_are_the_functions(accessor: type, name: str) -> None:
    """Same parameters (the accessor instead of the object), defaults and docs: declared
    once."""
    import xclay.explore.viz

    method = getattr(accessor, name)
    function = getattr(xclay, name, None) or getattr(xclay.explore, name, None)
    function = function or getattr(xclay.explore.viz, name)
    params = list(inspect.signature(function).parameters.values())[1:]
    assert list(inspect.signature(method).parameters.values())[1:] == params
    assert method.__doc__ == function.__doc__


def test_cuda_without_a_gpu_is_a_clear_error(demo_cube_256: xr.Dataset) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="asks for a CUDA GPU, but none is usable here"):
        _embed(demo_cube_256, device="cuda")


@pytest.mark.gpu
def test_a_gpu_index_beyond_those_present_is_a_clear_error() -> None:
    import torch

    from xclay.devices import resolve_device

    assert resolve_device("cuda:0").index == 0
    with pytest.raises(DeviceError, match=r"this process sees \d+ GPU\(s\)"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"chip_size": 512}, DatacubeError, "smaller than one chip"),
        ({"batch_size": 0}, ConfigError, "batch_size: must be positive, got 0"),
        ({"quality": {"max_nodata": 1.5}}, ConfigError, "max_nodata: must be within"),
        ({"quality": {"max_fog": 0.5}}, ConfigError, "unknown quality threshold"),
        ({"precision": "fp16"}, ConfigError, "precision: must be one of 'auto', 'fp32'"),
        ({"precision": "fp8", "device": "cpu"}, DeviceError, "FP8 tensor cores"),
        ({"precision": "tf32", "device": "cpu"}, DeviceError, "tensor-core mode"),
        ({"model": "nope"}, ModelError, "unknown model 'nope'"),
        (
            {"chipsize": 64},
            TypeError,
            "unexpected keyword argument 'chipsize' .did you mean 'chip_size'",
        ),
    ],
)
def test_bad_settings_are_refused(
    demo_cube_256: xr.Dataset, kw: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        _embed(demo_cube_256, **kw)


def test_not_a_datacube_is_refused() -> None:
    with pytest.raises(DatacubeError, match="no 'pixels' variable"):
        xclay.embed(xr.Dataset({"a": ("x", [1])}))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "uint32", "float32", "float64"])
def test_any_numeric_pixel_dtype_embeds(dtype: str) -> None:
    nodata = float("nan") if dtype.startswith("float") else 0
    cube = random_cube((1, 2, 64, 128), dtype=dtype, nodata=nodata)
    if dtype.startswith("float"):
        cube["pixels"].values[0, 0, :40, 64:] = np.nan  # 62.5 % of chip 1 is NaN: skipped
    emb = _embed(cube)
    assert emb["embedded"].values[0].tolist() == [[True, not dtype.startswith("float")]]
    assert np.isfinite(emb["embedding"].values[0, 0, 0]).all()


@pytest.mark.gpu
def test_gpu_embeddings_match_cpu(demo_cube_256: xr.Dataset) -> None:
    import torch

    cpu = _embed(demo_cube_256, model=xclay.models.get_model("rcf", num_filters=16, sample_chips=6))
    gpu = _embed(
        demo_cube_256,
        model=xclay.models.get_model("rcf", num_filters=16, sample_chips=6),
        device="cuda",
    )
    assert torch.cuda.is_available()
    np.testing.assert_allclose(
        gpu["embedding"].values, cpu["embedding"].values, rtol=1e-3, atol=1e-3
    )


def test_a_block_embeds_exactly_like_its_slice_of_the_whole(demo_cube_256: xr.Dataset) -> None:
    from xclay.batch.batching import Block
    from xclay.embed import EmbedConfig, EmbedSession
    from xclay.models.rcf import RCFEncoder

    config = EmbedConfig(grid=xclay.ChipGridSpec(chip_size=32), batch_size=5)
    session = EmbedSession(
        demo_cube_256, xclay.models.get_model("rcf", num_filters=8, sample_chips=4), config
    )
    whole = session.dataset(session.embed_block())
    again = EmbedSession(demo_cube_256, RCFEncoder.from_card(session.card), config)
    part = again.dataset(again.embed_block(Block((0, 1), (2, 5), (3, 8))))
    expected = whole.isel(chip_y=slice(2, 5), chip_x=slice(3, 8))
    xr.testing.assert_identical(part.drop_attrs(), expected.drop_attrs())
    assert part.attrs["run"]["chips_total"] == 15


def test_infinite_and_nan_pixels_are_never_embedded() -> None:
    cube = random_cube((1, 2, 64, 64), dtype="float32", nodata=None)
    cube["pixels"].values[0, 0, :32, :32] = np.inf  # chip (0, 0): all inf
    cube["pixels"].values[0, 1, :32, 32:] = np.nan  # chip (0, 1): all NaN
    cube["pixels"].values[0, 0, 32:40, :32] = -np.inf  # chip (1, 0): a quarter -inf
    emb = _embed(cube, chip_size=32, quality={"max_nodata": 0.5})
    assert emb["embedded"].values[0].tolist() == [[False, False], [True, True]]
    np.testing.assert_allclose(emb["nodata_fraction"].values[0], [[1.0, 1.0], [0.25, 0.0]])
    assert np.isfinite(emb["embedding"].values[0, 1]).all()
    assert np.isnan(emb["embedding"].values[0, 0]).all()


def test_a_stored_configuration_embeds_again_the_same(demo_cube_256: xr.Dataset) -> None:
    """embed() stores its configuration; embed_with_config() takes it back (the public
    entry point that takes an EmbedConfig) and gives the same embeddings."""
    first = xclay.embed(
        demo_cube_256,
        model=xclay.models.get_model("rcf", num_filters=8, sample_chips=4),
        chip_size=64,
        quality={"max_nodata": 0.2},
        progress=False,
    )
    config = xclay.EmbedConfig.from_dict(first.attrs["config"])
    assert config.grid.chip_size == 64 and config.quality.max_nodata == 0.2
    again = xclay.embed_with_config(
        demo_cube_256, xclay.models.get_model("rcf", num_filters=8, sample_chips=4), config
    )
    # data_path records the threads this machine's load left free: it may differ
    first.attrs.pop("data_path"), again.attrs.pop("data_path")
    xr.testing.assert_identical(first, again)
