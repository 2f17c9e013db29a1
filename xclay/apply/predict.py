"""A fitted model over a whole embeddings store: a map on the chip grid.

:func:`predict` reads the embeddings in blocks of whole stored chunks (at most
``block_mb`` of vectors at a time, the next block read while the model runs on this one),
on the GPU when there is one, and returns the map: a class and per-class probabilities per
chip (or a value), as a Dataset on the chip grid. Memory holds two blocks of vectors and
the map (``classes`` floats a chip: a 1024-d store's map is a hundredth of its size).

:func:`write_map` writes it: the class map (uint8 with a colour table; 255 no chip) or the
values (float32; NaN) as a Cloud-Optimized GeoTIFF, the per-class probabilities as another
(one band a class), a STAC item naming the model and its cross-validation scores, and a PNG
preview. The GeoTIFFs are on the chip grid (:func:`~xclay.outputs.export.chip_grid_transform`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from xclay.apply.model import MapModel, _open, _pooled, _time_index, load_model
from xclay.errors import ConfigError, MissingDependencyError
from xclay.outputs.export import chip_grid_transform
from xclay.storage import Location, StorageOptions, Where, location

__all__ = ["PALETTE", "MapFiles", "predict", "write_map"]

log = logging.getLogger(__name__)

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
PNG_TYPE = "image/png"
NO_CLASS = 255
# Colours of classes 0, 1, ... (Tableau 20), for the GeoTIFF's colour table and the preview.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip
_STAC_VERSION = "1.0.0"
_PROJ = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
_CLASSIFICATION = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"


def predict(
    emb: xr.Dataset | Where,
    model: MapModel | Where,
    *,
    time: int | None = None,
    device: str = "auto",
    block_mb: int = 256,
    storage_options: StorageOptions | None = None,
) -> xr.Dataset:
    """Predict a model over every chip of an embeddings store, block by block.

    Parameters
    ----------
    emb
        An embeddings Dataset, or the path or URL of an embeddings Zarr (opened lazily:
        only a block is in memory at a time). Given a path or URL, blocks are read straight
        from the store's chunk files (the fast way for a continent); given a Dataset,
        through xarray.
    model
        A fitted :class:`~xclay.apply.model.MapModel`, or the path or URL of its file. It
        refuses embeddings of another encoder.
    time
        The time step (index) of multi-step embeddings.
    device
        ``"auto"`` (a CUDA GPU when there is one, else the CPU), ``"cpu"`` or ``"cuda"``.
    block_mb
        Vectors read at a time, in MB (whole stored chunks; at least one chunk row).
    storage_options
        Settings for object storage beyond the environment.

    Returns
    -------
    xarray.Dataset
        On the embeddings' chip grid (``chip_y``, ``chip_x``, ``spatial_ref``, pixel
        offsets; the embeddings' ``datacube`` and ``config`` attributes and the model's
        description as ``map_model``): ``class`` (int16, -1 where a chip has no vector)
        and ``probability`` (``label``, ``chip_y``, ``chip_x``; float32, NaN; the ``label``
        coordinate names the classes) for classes,
        or ``value`` (float32, NaN) for values.
    """
    import torch

    from xclay.devices import ThreadBudget, resolve_device

    store = None if isinstance(emb, xr.Dataset) else location(emb, storage_options)
    emb = _open(emb, storage_options)
    if not isinstance(model, MapModel):
        model = load_model(model, storage_options=storage_options)
    model.check_embeddings(emb)
    if block_mb < 1:
        raise ConfigError(f"block_mb must be at least 1, got {block_mb}.")
    t = _time_index(emb, time)
    dev = resolve_device(device)
    n_y, n_x = int(emb.sizes["chip_y"]), int(emb.sizes["chip_x"])
    outputs = model.outputs
    values = np.full((outputs, n_y, n_x), np.nan, dtype=np.float32)
    weights = model.tensors(dev)
    blocks = list(_blocks(emb, block_mb << 20))
    budget = ThreadBudget.for_device(dev)
    threads = budget.decode if dev.type == "cuda" else budget.cores
    started = dt.datetime.now(dt.UTC)
    with (
        budget.applied(),
        torch.inference_mode(),
        _block_reader(store, emb, t, threads) as read,
    ):
        for (r0, r1, c0, c1), vectors in _read_ahead(read, blocks):
            flat = vectors.reshape(-1, vectors.shape[-1])
            out = _forward(model, weights, flat, dev)
            values[:, r0:r1, c0:c1] = out.reshape(r1 - r0, c1 - c0, outputs).transpose(2, 0, 1)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    log.info("predicted %d chips in %.1f s on %s", n_y * n_x, seconds, dev)
    return _as_dataset(emb, model, t, values)


def _forward(model: MapModel, weights: Any, flat: np.ndarray, device: Any) -> np.ndarray:
    import torch

    out = []
    step = 16384
    for start in range(0, len(flat), step):
        part = torch.from_numpy(np.ascontiguousarray(flat[start : start + step]))
        got = model.forward(part.to(device, non_blocking=True), weights)
        out.append(got.reshape(len(part), -1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.outputs), np.float32)


def _blocks(emb: xr.Dataset, budget: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks of whole stored chunks (rows of chunks, split along columns when a row of
    chunks is over ``budget`` bytes), in row-major order."""
    n_y, n_x = int(emb.sizes["chip_y"]), int(emb.sizes["chip_x"])
    chunks = emb["embedding"].encoding.get("chunks") or emb["embedding"].encoding.get(
        "preferred_chunks"
    )
    if isinstance(chunks, dict):
        cy, cx = int(chunks.get("chip_y", n_y)), int(chunks.get("chip_x", n_x))
    elif chunks:
        cy, cx = int(chunks[1]), int(chunks[2])
    else:
        cy, cx = min(n_y, 32), min(n_x, 32)
    per_chip = 4 * int(np.prod([emb.sizes[d] for d in emb["embedding"].dims[3:]]))
    cols = max(cx, min(n_x, (budget // max(1, per_chip * cy)) // cx * cx))
    rows = cy * max(1, budget // max(1, per_chip * cy * cols))
    for r0 in range(0, n_y, rows):
        for c0 in range(0, n_x, cols):
            yield r0, min(n_y, r0 + rows), c0, min(n_x, c0 + cols)


def _read_ahead(
    read: Callable[[tuple[int, int, int, int]], np.ndarray],
    blocks: list[tuple[int, int, int, int]],
) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Each block's vectors ``[rows, cols, dim]``, the next block read in a thread while the
    caller works on this one."""
    if not blocks:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="xclay-predict-read") as pool:
        pending: Future[np.ndarray] = pool.submit(read, blocks[0])
        for k, block in enumerate(blocks):
            vectors = pending.result()
            if k + 1 < len(blocks):
                pending = pool.submit(read, blocks[k + 1])
            yield block, vectors


@contextlib.contextmanager
def _block_reader(
    store: Location | None, emb: xr.Dataset, t: int, threads: int
) -> Iterator[Callable[[tuple[int, int, int, int]], np.ndarray]]:
    """What reads a block's vectors ``[rows, cols, dim]``: straight from the store's chunk
    files where it can (:func:`_chunk_reader`), else through xarray (patch grids averaged)."""
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="xclay-predict-chunks")
    try:
        direct = _chunk_reader(store, emb, t, pool)
        if direct is not None:
            yield direct
            return
        embedding = emb["embedding"].isel(time=t)

        def read(block: tuple[int, int, int, int]) -> np.ndarray:
            r0, r1, c0, c1 = block
            part = embedding.isel(chip_y=slice(r0, r1), chip_x=slice(c0, c1))
            return _pooled(np.asarray(part.values, dtype=np.float32))

        yield read
    finally:
        pool.shutdown(wait=True)


def _chunk_reader(
    store: Location | None, emb: xr.Dataset, t: int, pool: ThreadPoolExecutor
) -> Callable[[tuple[int, int, int, int]], np.ndarray] | None:
    """Blocks read straight from the store's chunk files (the batch path's
    :mod:`xclay.datacube.chunks`: one ``pread`` a chunk, or ranged GETs on object storage,
    checked and decoded by ``pool``), where the store is float vectors in a layout it
    reads; None otherwise (then xarray reads them, through zarr-python)."""
    from xclay.datacube.chunks import (
        ArrayLayout,
        ChunkLocator,
        UnsupportedLayout,
        _byte_range,
        _host_decoder,
        decode_stored,
        read_chunk,
    )
    from xclay.outputs.quantize import quantization_of
    from xclay.storage.ranges import read_ranges

    if store is None or quantization_of(emb) or emb["embedding"].ndim != 4:
        return None
    try:
        layout = ArrayLayout.open(store / "embedding")
    except UnsupportedLayout as err:
        log.info("embeddings read through zarr: %s", err)
        return None
    dim = int(emb.sizes["feature"])
    _, cy, cx, cf = layout.chunk_shape
    if layout.dtype.kind != "f" or cf != dim or layout.shape != tuple(emb["embedding"].shape):
        return None
    locator = ChunkLocator(layout)
    decoder = _host_decoder(layout)
    fill = np.float32(np.nan if layout.fill_value in (None, "NaN") else layout.fill_value)

    def read(block: tuple[int, int, int, int]) -> np.ndarray:
        r0, r1, c0, c1 = block
        out = np.empty((r1 - r0, c1 - c0, dim), dtype=np.float32)
        chunks = [
            (t, gy, gx, 0)
            for gy in range(r0 // cy, -(-r1 // cy))
            for gx in range(c0 // cx, -(-c1 // cx))
        ]
        refs = locator.find_many(chunks)
        stored: list[Any] = [None] * len(chunks)
        if locator.gathers:  # object storage: every chunk of the block fetched at once
            wanted = [k for k, ref in enumerate(refs) if ref is not None]
            got = read_ranges([_byte_range(layout, refs[k]) for k in wanted])  # type: ignore[arg-type]
            for k, data in zip(wanted, got, strict=True):
                stored[k] = data

        def one(k: int) -> None:
            _, gy, gx, _ = chunks[k]
            ref = refs[k]
            buffer = np.empty(layout.chunk_shape, dtype=layout.dtype)
            if ref is None or (locator.gathers and stored[k] is None):
                buffer.fill(fill)
            elif stored[k] is not None:
                decode_stored(layout, ref, stored[k], buffer, decoder)
            else:
                read_chunk(layout, ref, buffer, decoder)
            y0, x0 = gy * cy, gx * cx
            ya, yb = max(y0, r0), min(y0 + cy, r1, layout.shape[1])
            xa, xb = max(x0, c0), min(x0 + cx, c1, layout.shape[2])
            out[ya - r0 : yb - r0, xa - c0 : xb - c0] = buffer[
                0, ya - y0 : yb - y0, xa - x0 : xb - x0
            ]

        for future in [pool.submit(one, k) for k in range(len(chunks))]:
            future.result()
        return out

    return read


def _as_dataset(emb: xr.Dataset, model: MapModel, t: int, values: np.ndarray) -> xr.Dataset:
    dims = ("chip_y", "chip_x")
    coords: dict[str, Any] = {
        name: emb[name] for name in ("chip_y", "chip_x", "row_off", "col_off") if name in emb.coords
    }
    if "spatial_ref" in emb.coords:
        coords["spatial_ref"] = emb["spatial_ref"]
    coords["time"] = emb["time"].values[t]
    attrs = {
        "datacube": emb.attrs["datacube"],
        "config": emb.attrs["config"],
        "map_model": {
            "kind": model.kind,
            "task": model.task,
            "classes": list(model.classes) if model.classes is not None else None,
            "params": model.params,
            "fingerprint": model.fingerprint,
            "scores": _summary(model),
            "embeddings_model": model.embeddings.get("model", {}).get("name"),
            "created": model.created,
        },
    }
    placed = {"grid_mapping": "spatial_ref"} if "spatial_ref" in coords else {}
    data: dict[str, Any]
    if model.classes is None:
        data = {"value": (dims, values[0], {"long_name": "predicted value", **placed})}
    else:
        finite = np.isfinite(values).all(axis=0)
        best = np.where(finite, np.nan_to_num(values).argmax(axis=0), -1).astype(np.int16)
        coords["label"] = ("label", np.asarray(model.classes, dtype=object))
        data = {
            "class": (
                dims,
                best,
                {
                    "long_name": "predicted class (index into the label coordinate; -1: no chip)",
                    **placed,
                },
            ),
            "probability": (
                ("label", *dims),
                values,
                {"long_name": "predicted probability of each class", "units": "1", **placed},
            ),
        }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _summary(model: MapModel) -> dict[str, Any]:
    """The headline scores of a model's cross-validation (for tags and STAC)."""
    oof = model.scores.get("out_of_fold", {})
    cv = model.scores.get("cv", {})
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "r2", "rmse", "mae", "n")
    out: dict[str, Any] = {k: oof[k] for k in keys if k in oof}
    out["cv"] = {k: cv.get(k) for k in ("method", "folds", "block_m", "range_m")}
    if "per_class" in oof:
        out["f1"] = {name: v["f1"] for name, v in oof["per_class"].items()}
    return out


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class MapFiles:
    """What :func:`write_map` wrote (paths, or URLs).

    Attributes
    ----------
    map
        The class map (uint8) or the values (float32), a COG.
    probability
        The per-class probabilities, a COG; None for values.
    stac
        The STAC item (JSON).
    preview
        The PNG preview.
    """

    map: Path | str
    probability: Path | str | None
    stac: Path | str
    preview: Path | str

    def all(self) -> list[Path | str]:
        return [p for p in (self.map, self.probability, self.stac, self.preview) if p is not None]


def write_map(
    prediction: xr.Dataset,
    path: Where,
    *,
    model: Where | None = None,
    overwrite: bool = False,
    storage_options: StorageOptions | None = None,
) -> MapFiles:
    """Write a prediction (:func:`predict`) as COGs, a STAC item and a PNG preview.

    Parameters
    ----------
    prediction
        What :func:`predict` returned.
    path
        The map GeoTIFF (a path or URL); beside it ``<stem>_probability.tif`` (classes),
        ``<stem>.json`` (STAC item) and ``<stem>.png``.
    model
        The model file, linked from the STAC item (default: none linked; the item still
        holds the model's description and scores).
    overwrite
        Replace existing files; by default an existing one is an
        :class:`~xclay.errors.OutputExistsError`.
    storage_options
        Settings for object storage beyond the environment.

    Returns
    -------
    MapFiles
        The files written.
    """
    target = location(path, storage_options)
    info = prediction.attrs["map_model"]
    classes = info.get("classes")
    written: dict[str, Location] = {}
    tags = {
        "XCLAY_MAP_MODEL": json.dumps(
            {k: info[k] for k in ("kind", "task", "classes", "params", "fingerprint")}
        ),
        "XCLAY_MAP_SCORES": json.dumps(info["scores"]),
        "XCLAY_MAP_TIME": _day(prediction),
    }
    if classes is not None:
        if len(classes) > NO_CLASS:
            raise ConfigError(f"{len(classes)} classes do not fit a uint8 class map (255 at most).")
        best = np.asarray(prediction["class"].values)
        band = np.where(best < 0, NO_CLASS, best).astype(np.uint8)
        _write_cog(
            prediction,
            band[None],
            target,
            "uint8",
            NO_CLASS,
            [("class", None)],
            tags,
            overwrite,
            colours=len(classes),
        )
        written["map"] = target
        probability = target.with_name(f"{target.stem}_probability.tif")
        _write_cog(
            prediction,
            np.asarray(prediction["probability"].values, dtype=np.float32),
            probability,
            "float32",
            float("nan"),
            [(f"probability of {name}", None) for name in classes],
            tags,
            overwrite,
        )
        written["probability"] = probability
    else:
        value = np.asarray(prediction["value"].values, dtype=np.float32)
        _write_cog(
            prediction,
            value[None],
            target,
            "float32",
            float("nan"),
            [("value", None)],
            tags,
            overwrite,
        )
        written["map"] = target
    preview = target.with_name(f"{target.stem}.png")
    _write_png(prediction, preview, overwrite)
    written["preview"] = preview
    stac = target.with_name(f"{target.stem}.json")
    item = _stac_item(
        prediction, written, stac, location(model, storage_options) if model else None
    )
    stac.write_text(json.dumps(item, indent=2) + "\n", overwrite=overwrite)

    def out(where: Location | None) -> Path | str | None:
        if where is None:
            return None
        return where.path if where.is_local else where.url

    return MapFiles(
        out(written["map"]) or "",
        out(written.get("probability")),
        out(stac) or "",
        out(preview) or "",
    )


def _rasterio() -> Any:
    try:
        import rasterio
        import rasterio.shutil
    except ImportError as err:
        raise MissingDependencyError(
            "writing maps needs rasterio: pip install 'xclay[io]'."
        ) from err
    return rasterio


def _write_cog(
    prediction: xr.Dataset,
    bands: np.ndarray,
    where: Location,
    dtype: str,
    nodata: float,
    names: list[tuple[str, str | None]],
    tags: dict[str, str],
    overwrite: bool,
    colours: int = 0,
) -> None:
    rasterio = _rasterio()
    count, n_y, n_x = bands.shape
    block = 512 if max(n_y, n_x) > 512 else 256
    profile = {
        "driver": "GTiff",
        "width": n_x,
        "height": n_y,
        "count": count,
        "dtype": dtype,
        "crs": prediction.attrs["datacube"]["crs_wkt"],
        "transform": chip_grid_transform(prediction),
        "nodata": nodata,
    }
    with where.staged(overwrite=overwrite) as tmp:
        staging = tmp.with_name(tmp.name + ".staging.tif")
        try:
            with rasterio.open(staging, "w", **profile) as dst:
                dst.write(bands.astype(dtype))
                for i, (name, _) in enumerate(names, start=1):
                    dst.set_band_description(i, name)
                if colours:
                    dst.write_colormap(
                        1, {k: (*PALETTE[k % len(PALETTE)], 255) for k in range(colours)}
                    )
                dst.update_tags(**tags)
                if colours:
                    classes = prediction.attrs["map_model"]["classes"]
                    dst.update_tags(1, **{f"CLASS_{k}": name for k, name in enumerate(classes)})
            rasterio.shutil.copy(
                staging,
                tmp,
                driver="COG",
                BLOCKSIZE=block,
                COMPRESS="DEFLATE",
                OVERVIEWS="AUTO",
                RESAMPLING="NEAREST" if colours else "AVERAGE",
                BIGTIFF="IF_SAFER",
            )
        finally:
            staging.unlink(missing_ok=True)


def _rgba(prediction: xr.Dataset) -> np.ndarray:
    """``[y, x, 4]`` uint8: class colours, or values on a blue-to-yellow ramp; clear where
    there is no chip."""
    if "class" in prediction.data_vars:
        best = np.asarray(prediction["class"].values)
        palette = np.array([(*c, 255) for c in PALETTE] + [(0, 0, 0, 0)], dtype=np.uint8)
        index = np.where(best < 0, len(PALETTE), best % len(PALETTE))
        result: np.ndarray = palette[index]
        return result
    value = np.asarray(prediction["value"].values, dtype=np.float64)
    finite = np.isfinite(value)
    low, high = np.percentile(value[finite], [2, 98]) if finite.any() else (0.0, 1.0)
    scaled = np.clip((value - low) / max(high - low, 1e-12), 0, 1)
    ramp = np.stack([scaled, 0.3 + 0.6 * scaled, 1 - scaled], axis=-1)
    rgba = np.zeros((*value.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.nan_to_num(ramp * 255).astype(np.uint8)
    rgba[..., 3] = np.where(finite, 255, 0)
    return rgba


def _write_png(prediction: xr.Dataset, where: Location, overwrite: bool) -> None:
    from PIL import Image

    rgba = _rgba(prediction)
    scale = max(1, int(np.ceil(256 / max(1, max(rgba.shape[:2])))))
    image = Image.fromarray(rgba, mode="RGBA")
    if scale > 1:
        image = image.resize(
            (rgba.shape[1] * scale, rgba.shape[0] * scale), Image.Resampling.NEAREST
        )
    with where.staged(overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG")


def _day(prediction: xr.Dataset) -> str:
    value = np.asarray(prediction["time"].values).astype("datetime64[D]")
    return "unknown-date" if np.isnat(value) else str(value)


def _stac_item(
    prediction: xr.Dataset, written: dict[str, Location], stac: Location, model: Location | None
) -> dict[str, Any]:
    import shapely
    from odc.geo.geom import Geometry

    info = prediction.attrs["map_model"]
    transform = chip_grid_transform(prediction)
    n_y, n_x = int(prediction.sizes["chip_y"]), int(prediction.sizes["chip_x"])
    crs = prediction.attrs["datacube"]["crs_wkt"]
    corners = [
        transform @ (0, 0),
        transform @ (n_x, 0),
        transform @ (n_x, n_y),
        transform @ (0, n_y),
    ]
    shape = shapely.segmentize(shapely.Polygon(corners), abs(transform.a))
    lonlat = Geometry(shape, crs=crs).to_crs("EPSG:4326").geom
    folder = stac.parent
    day = _day(prediction)
    assets: dict[str, Any] = {}
    classes = info.get("classes")
    map_asset: dict[str, Any] = {
        "href": written["map"].href_from(folder),
        "type": COG_MEDIA_TYPE,
        "roles": ["data"],
        "title": "class map (uint8, 255: no chip)" if classes else "predicted value (float32)",
    }
    if classes:
        map_asset["classification:classes"] = [
            {
                "value": k,
                "name": _stac_name(name),
                "description": str(name),
                "color_hint": "{:02X}{:02X}{:02X}".format(*PALETTE[k % len(PALETTE)]),
            }
            for k, name in enumerate(classes)
        ]
        map_asset["classification:classes"].append(
            {"value": NO_CLASS, "name": "no_chip", "nodata": True, "description": "no vector"}
        )
    assets["map"] = map_asset
    if "probability" in written:
        assets["probability"] = {
            "href": written["probability"].href_from(folder),
            "type": COG_MEDIA_TYPE,
            "roles": ["data"],
            "title": "per-class probability (float32, one band a class)",
        }
    assets["preview"] = {
        "href": written["preview"].href_from(folder),
        "type": PNG_TYPE,
        "roles": ["overview", "visual"],
        "title": "preview",
    }
    if model is not None:
        assets["model"] = {
            "href": model.href_from(folder),
            "type": "application/json",
            "roles": ["metadata"],
            "title": f"the model ({info['kind']}, fitted on {info.get('embeddings_model')} embeddings)",
        }
    datetime = f"{day}T00:00:00Z" if day != "unknown-date" else "1900-01-01T00:00:00Z"
    code = _proj_code(crs)
    properties: dict[str, Any] = {
        "datetime": datetime,
        "proj:shape": [n_y, n_x],
        "proj:transform": [float(v) for v in tuple(transform)[:6]],
        "xclay:model": {k: info[k] for k in ("kind", "task", "params", "fingerprint")},
        "xclay:embeddings_model": info.get("embeddings_model"),
        "xclay:scores": info["scores"],
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if code:
        properties["proj:code"] = code
    else:
        properties["proj:wkt2"] = crs
    return {
        "type": "Feature",
        "stac_version": _STAC_VERSION,
        "stac_extensions": [_PROJ, *([_CLASSIFICATION] if classes else [])],
        "id": f"{written['map'].stem}-{day}",
        "geometry": json.loads(shapely.to_geojson(lonlat)),
        "bbox": [float(v) for v in lonlat.bounds],
        "properties": properties,
        "assets": assets,
        "links": [],
    }


def _stac_name(name: str) -> str:
    """A class name as the classification extension wants it (letters, digits, _ and -)."""
    clean = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in str(name))
    return clean or "class"


def _proj_code(crs_wkt: str) -> str | None:
    from pyproj import CRS

    found = CRS.from_wkt(crs_wkt).to_authority()
    return f"{found[0]}:{found[1]}" if found else None
