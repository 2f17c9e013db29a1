"""Items files as the ecosystem ships large catalogues: stac-geoparquet (a file or a folder)
and newline-delimited JSON, read as streams; an ItemCollection JSON as before; anything
else one line saying which formats are read."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS, write_stac_geoparquet
from xclay.errors import IngestError
from xclay.ingest import load_items, stac_item
from xclay.ingest.itemfiles import ITEMS_FORMATS, item_batches, items_format
from xclay.storage import location

if TYPE_CHECKING:
    import pystac

pytest.importorskip("pystac", reason="needs xclay[io]")
pytest.importorskip("odc.stac", reason="needs xclay[io]")


def _items(n: int) -> list[dict[str, Any]]:
    """``n`` STAC Item dicts: footprints on a line of tiles, a date each, two assets (one
    relative href, one URL), a property that only some items have."""
    out = []
    for k in range(n):
        w, s = -40.0 + 0.1 * k, -8.0
        when = dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC) + dt.timedelta(days=k)
        properties: dict[str, Any] = {
            "datetime": when.isoformat().replace("+00:00", "Z"),
            "proj:epsg": 32725,
        }
        if k % 2:
            properties["eo:cloud_cover"] = float(k)
        out.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "stac_extensions": [],
                "id": f"item-{k:03d}",
                "collection": "tiles",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[w, s], [w + 0.1, s], [w + 0.1, s + 0.1], [w, s + 0.1], [w, s]]
                    ],
                },
                "bbox": [w, s, w + 0.1, s + 0.1],
                "properties": properties,
                "links": [],
                "assets": {
                    "red": {"href": f"data/{k}_red.tif", "type": "image/tiff", "roles": ["data"]},
                    "nir": {
                        "href": f"https://example.com/{k}_nir.tif",
                        "type": "image/tiff",
                        "roles": ["data"],
                    },
                },
            }
        )
    return out


def _same(a: list[pystac.Item], b: list[pystac.Item]) -> None:
    assert [i.id for i in a] == [i.id for i in b]
    for x, y in zip(a, b, strict=True):
        assert x.datetime == y.datetime
        assert x.bbox == pytest.approx(y.bbox)
        assert x.geometry is not None and y.geometry is not None
        assert x.geometry["coordinates"] == y.geometry["coordinates"]
        assert {k: a.href for k, a in x.assets.items()} == {k: a.href for k, a in y.assets.items()}
        assert x.properties.get("eo:cloud_cover") == y.properties.get("eo:cloud_cover")
        assert x.collection_id == y.collection_id


@pytest.fixture
def formats(tmp_path: Path) -> dict[str, Path]:
    """The same 12 items as an ItemCollection JSON, NDJSON, a stac-geoparquet file and a
    folder of two stac-geoparquet files."""
    items = _items(12)
    out = {"json": tmp_path / "items.json", "ndjson": tmp_path / "items.ndjson",
           "parquet": tmp_path / "items.parquet", "folder": tmp_path / "parts"}  # fmt: skip
    out["json"].write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    out["ndjson"].write_text("".join(json.dumps(i) + "\n" for i in items))
    write_stac_geoparquet(items, out["parquet"])
    out["folder"].mkdir()
    for item in items:  # relative to each part, which lies a folder down
        item["assets"]["red"]["href"] = "../" + item["assets"]["red"]["href"]
    write_stac_geoparquet(items[:5], out["folder"] / "part-0.parquet")
    write_stac_geoparquet(items[5:], out["folder"] / "part-1.parquet")
    return out


def test_every_items_format_gives_the_same_items(formats: dict[str, Path]) -> None:
    reference = load_items(formats["json"])
    assert reference[0].assets["red"].href == str(formats["json"].parent / "data" / "0_red.tif")
    for name in ("ndjson", "parquet", "folder"):
        _same(load_items(formats[name]), reference)
    assert [items_format(location(p)) for p in formats.values()] == [
        "json",
        "ndjson",
        "parquet",
        "parquet",
    ]


def test_formats_are_known_by_their_bytes_not_only_their_names(
    formats: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "a").write_bytes(formats["parquet"].read_bytes())
    (tmp_path / "b").write_bytes(formats["ndjson"].read_bytes())
    (tmp_path / "c").write_text(json.dumps(_items(1)[0], indent=2))  # one Item, indented
    assert [items_format(location(tmp_path / n)) for n in "abc"] == ["parquet", "ndjson", "json"]
    _same(load_items(tmp_path / "a"), load_items(formats["json"]))
    assert [i.id for i in load_items(tmp_path / "c")] == ["item-000"]


def test_large_files_are_read_a_batch_at_a_time(formats: dict[str, Path]) -> None:
    for name in ("ndjson", "parquet", "folder"):
        batches = list(item_batches(location(formats[name]), batch=5))
        assert all(len(b) <= 5 for b in batches) and sum(map(len, batches)) == 12, name
        assert [len(b) for b in batches][:1] == [5], name


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("binary", b"\x00\x9f\xff\xfe garbage", "expected a STAC ItemCollection"),
        ("text.json", b"not json at all", "expected a STAC ItemCollection"),
        ("lines.ndjson", b'{"type": "Feature", "id": "a", "properties": {}}\n{oops\n', "line 2"),
        ("fc.ndjson", b'{"type": "FeatureCollection", "features": []}\n', "not a STAC Item"),
        ("truncated.parquet", b"PAR1" + b"\x00" * 64, "not a readable Parquet file"),
    ],
)
def test_an_unreadable_items_file_is_one_line_saying_what_is_expected(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(IngestError, match=expected) as info:
        load_items(path)
    assert "\n" not in str(info.value)


def test_a_parquet_file_without_stac_columns_names_them(tmp_path: Path) -> None:
    pq.write_table(pa.table({"name": ["a"], "value": [1]}), tmp_path / "table.parquet")
    with pytest.raises(
        IngestError, match=r"without stac-geoparquet's columns \['id', 'geometry'\]"
    ):
        load_items(tmp_path / "table.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match=r"folder without \.parquet files"):
        load_items(tmp_path / "empty")
    with pytest.raises(IngestError, match="does not exist"):
        load_items(tmp_path / "none.ndjson")
    assert "stac-geoparquet" in ITEMS_FORMATS and "newline-delimited" in ITEMS_FORMATS


def _olinda_spec(folder: Path, items: str) -> Path:
    spec = {
        "input": {"stac": {"items": items}, "bands": OLINDA_BANDS},
        "grid": {"resolution": 28.5, "chip_size": 32},
        "outputs": {"dir": "out"},
    }
    path = folder / f"{Path(items).stem}-{Path(items).suffix[1:] or 'none'}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _dry_run(spec: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xclay.cli", "run", str(spec), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_dry_run_plans_from_stac_geoparquet_and_ndjson_as_from_json(
    olinda_tif: Path, tmp_path: Path
) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS, id="olinda")
    doc = item.to_dict()
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection",
                                                     "features": [doc]}))  # fmt: skip
    (tmp_path / "items.ndjson").write_text(json.dumps(doc) + "\n")
    write_stac_geoparquet([doc], tmp_path / "items.parquet")
    plans = {}
    for name in ("items.json", "items.ndjson", "items.parquet"):
        done = _dry_run(_olinda_spec(tmp_path, name))
        assert done.returncode == 0, done.stderr
        plans[name] = done.stdout.split("\n", 1)[1]  # the plan, below the spec's name
    assert plans["items.json"] == plans["items.ndjson"] == plans["items.parquet"]
    assert "items       1 (olinda)" in plans["items.json"]


def test_a_dry_run_over_an_unreadable_items_file_ends_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "items.bin").write_bytes(bytes(range(256)) * 4)
    done = _dry_run(_olinda_spec(tmp_path, "items.bin"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "items.bin" in lines[0] and "stac-geoparquet" in lines[0], lines
