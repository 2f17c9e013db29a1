"""What users' own tests need from xclay, as ``zarr.testing`` is for zarr.

- :func:`synthetic_cube`: a small datacube of seeded random pixels on a real grid.
- :func:`write_clay_checkpoint`: Clay v1.5 weights of any size, random but seeded, in the
  official checkpoint's layout (or a plain state dict, or safetensors), so code that loads
  ``clay-v1.5`` runs without the 5 GB download.
- :func:`check_encoder`: the contract a new encoder must keep for xclay to run it (through
  the registry, on Dask workers, resumably), checked on a real embedding run.

Importing this module imports neither torch nor odc-geo; each function imports what it
uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

if TYPE_CHECKING:
    from xclay.model_card import ModelCard
    from xclay.protocols import Encoder

__all__ = ["check_encoder", "synthetic_cube", "write_clay_checkpoint"]


def synthetic_cube(
    shape: tuple[int, int, int, int] = (1, 4, 96, 80),
    *,
    dtype: str = "uint16",
    seed: int = 0,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500000.0, 4000000.0),
    res: float = 10.0,
    nodata: float | None = 0,
) -> xr.Dataset:
    """A datacube of seeded random pixels on a north-up grid.

    Parameters
    ----------
    shape
        ``(time, band, y, x)``; bands are named ``b0, b1, ...`` with central wavelengths
        0.45, 0.55, ... micrometres; times are daily from 2024-06-01.
    dtype
        Pixel dtype: integers hold 1..9999, floats 0.01..1.
    seed
        Seed of the pixels.
    crs, origin, res
        The grid: its CRS, top-left corner (x, y) in CRS units, and pixel size.
    nodata
        The pixels' nodata value (``None``: none).

    Returns
    -------
    xarray.Dataset
        A datacube as :func:`xclay.as_datacube` makes it.
    """
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    import xclay

    t, b, ny, nx = shape
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        data = rng.uniform(0.01, 1.0, size=shape).astype(dtype)
    else:
        data = rng.integers(1, 10_000, size=shape).astype(dtype)
    box = GeoBox((ny, nx), Affine(res, 0, origin[0], 0, -res, origin[1]), crs)
    coords = xr_coords(box, crs_coord_name="spatial_ref")
    pixels = xr.DataArray(
        data,
        dims=("time", "band", "y", "x"),
        coords={
            "time": np.array(["2024-06-01"] * t, dtype="datetime64[ns]")
            + np.arange(t).astype("timedelta64[D]"),
            "band": [f"b{i}" for i in range(b)],
            "y": coords["y" if "y" in coords else "latitude"].values,
            "x": coords["x" if "x" in coords else "longitude"].values,
            "spatial_ref": coords["spatial_ref"],
        },
    )
    if nodata is not None:
        pixels.attrs["nodata"] = nodata
    gsd = 11.0 if box.crs is not None and box.crs.geographic else None  # ~0.0001 degrees
    return xclay.as_datacube(pixels, wavelengths=[0.45 + 0.1 * i for i in range(b)], gsd=gsd)


def write_clay_checkpoint(
    path: str | os.PathLike[str],
    *,
    size: str = "tiny",
    seed: int = 0,
    fmt: Literal["ckpt", "pt", "safetensors"] = "ckpt",
    model: Any = None,
) -> Path:
    """Write Clay v1.5 encoder weights, random but seeded, where xclay loads weights from.

    Parameters
    ----------
    path
        The file to write.
    size
        ``tiny``, ``small``, ``base`` or ``large`` (the official weights are ``large``).
    seed
        Seed of the weights (``torch.manual_seed``).
    fmt
        ``ckpt``: the official Lightning checkpoint's layout (``state_dict`` with
        ``model.encoder.*`` keys beside decoder and teacher entries, ``hyper_parameters``
        naming the size); ``pt``: the encoder's plain state dict; ``safetensors``.
    model
        A :class:`~xclay.models.clay_encoder.ClayEncoder` whose weights to write instead
        of new random ones.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import torch

    from xclay.models.clay_encoder import ClayEncoder

    if model is None:
        torch.manual_seed(seed)
        model = ClayEncoder.from_size(size)
    weights = model.state_dict()
    path = Path(path)
    if fmt == "ckpt":
        state = {f"model.encoder.{k}": v for k, v in weights.items()}
        state["model.decoder.mask_patch"] = torch.zeros(8)
        state["model.teacher.cls_token"] = torch.zeros(1, 1, 8)
        hyper = {"model_size": size, "norm_pix_loss": False}
        torch.save({"state_dict": state, "hyper_parameters": hyper}, path)
    elif fmt == "pt":
        torch.save(weights, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        raise ValueError(f"fmt must be 'ckpt', 'pt' or 'safetensors', got {fmt!r}.")
    return path


def check_encoder(
    model: str | Callable[[], Encoder],
    *,
    cube: xr.Dataset | None = None,
    chip_size: int = 32,
    checkpoint: str | os.PathLike[str] | None = None,
    tolerance: float = 1e-5,
) -> ModelCard:
    """Check that an encoder keeps the contract xclay relies on, on a real embedding run.

    What is checked: it is an :class:`~xclay.protocols.Encoder` with a valid
    ``preferred_precision``; a run embeds every valid chip into a finite float32 vector
    of the card's ``dim``; its model card survives JSON (it goes into every output and
    to Dask workers); two runs give the same vectors, and so do batches of 1 and of 4
    (a chip's vector does not depend on its neighbours in a batch); and, for a registered
    model, the encoder its registry entry rebuilds from the card (what a Dask worker
    runs) gives the same vectors.

    Parameters
    ----------
    model
        A registry name, or a callable returning a new encoder each call.
    cube
        The datacube to embed (default: :func:`synthetic_cube` with 4 bands, 64 x 64 px).
    chip_size
        Chip edge in pixels.
    checkpoint
        Weights, with a registry name that needs them.
    tolerance
        Largest absolute difference allowed between vectors that should be equal.

    Returns
    -------
    ModelCard
        The card of the prepared encoder.

    Raises
    ------
    AssertionError
        Listing every part of the contract the encoder breaks.
    """
    import xclay
    from xclay.devices import PRECISIONS
    from xclay.model_card import ModelCard
    from xclay.models.registry import encoder_from_card, get_model, get_model_info
    from xclay.protocols import Encoder

    cube = cube if cube is not None else synthetic_cube((1, 4, 64, 64), seed=1)

    def build() -> Encoder:
        return get_model(model, checkpoint=checkpoint) if isinstance(model, str) else model()

    def run(encoder: Encoder, batch: int) -> xr.Dataset:
        return xclay.embed(
            cube, model=encoder, chip_size=chip_size, batch_size=batch, progress=False
        )

    problems: list[str] = []
    encoder = build()
    if not isinstance(encoder, Encoder):
        raise AssertionError(
            f"{type(encoder).__name__} is not an Encoder: it needs card, preferred_precision, "
            "prepare(spec, sample, *, device, precision) and encode(batch)."
        )
    if encoder.preferred_precision not in PRECISIONS:
        problems.append(f"preferred_precision {encoder.preferred_precision!r} not in {PRECISIONS}")
    first = run(encoder, 4)
    card = ModelCard.from_dict(first.attrs["model"])
    vectors = first["embedding"].values
    embedded = first["embedded"].values
    if vectors.dtype != np.float32:
        problems.append(f"embeddings are {vectors.dtype}, not float32")
    if vectors.shape[-1] != card.dim:
        problems.append(f"vectors have {vectors.shape[-1]} values, the card says dim {card.dim}")
    if not embedded.any():
        problems.append("no chip was embedded")
    elif not np.isfinite(vectors[embedded]).all():
        problems.append("some embedded chips have non-finite vectors")
    try:
        again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
        if again != card:
            problems.append("the model card changes through JSON")
    except (TypeError, ValueError) as err:
        problems.append(f"the model card does not survive JSON: {err}")

    def differs(other: xr.Dataset, what: str) -> None:
        got = other["embedding"].values
        if got.shape != vectors.shape or not np.allclose(
            got[embedded], vectors[embedded], rtol=0, atol=tolerance, equal_nan=True
        ):
            worst = (
                np.nanmax(np.abs(got[embedded] - vectors[embedded]))
                if got.shape == vectors.shape
                else "shape"
            )
            problems.append(f"{what} gives other vectors (largest difference {worst})")

    differs(run(build(), 4), "a second run")
    differs(run(build(), 1), "a batch of 1 instead of 4")
    if isinstance(model, str) and get_model_info(model).rebuild is not None:
        differs(
            run(encoder_from_card(card, checkpoint=checkpoint), 4),
            "the encoder rebuilt from its card",
        )
    if problems:
        raise AssertionError(
            f"encoder {card.name!r} breaks xclay's contract: " + "; ".join(problems)
        )
    return card
