"""Each setting declared once (xclay.settings): the checks, the run spec, the CLI's flags,
embed()'s keywords and the docs' table all come from the declarations."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xclay.embed import EmbedOptions, EmbedSettings
from xclay.errors import ConfigError
from xclay.run.spec import SECTIONS, ComputeSettings, ModelSettings, RunSpec, settings_table
from xclay.settings import (
    Setting,
    add_flags,
    declared,
    documented,
    flag_values,
    markdown_rows,
    read_section,
    settings_of,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_table_of_fields_is_made_from_the_declarations() -> None:
    page = (ROOT / "docs" / "run-spec.md").read_text()
    assert settings_table() in page, (
        "docs/run-spec.md's table of fields differs from the declarations; paste in what "
        'python -c "from xclay.run.spec import settings_table as t; print(t())" prints'
    )


def test_embeds_typed_keywords_are_its_declared_options() -> None:
    """EmbedSettings (embed()'s **settings, for static typing) has EmbedOptions' fields
    with their types: one list of settings, held in two forms only where Python needs
    both."""
    typed = typing.get_type_hints(EmbedSettings)
    declared_types = typing.get_type_hints(EmbedOptions)
    assert list(typed) == [f.name for f in dataclasses.fields(EmbedOptions)]
    for name, hint in typed.items():
        if name not in ("quality", "thumbnails"):  # accepted in more forms than stored
            assert hint == declared_types[name], name


def test_one_shared_declaration_for_the_embedding_and_the_spec() -> None:
    """The spec's compute, grid and outputs sections hold embed()'s settings by the same
    declaration (one default, one check, one doc)."""
    options = {f.name: f.metadata.get("setting") for f in dataclasses.fields(EmbedOptions)}
    found = 0
    for cls in SECTIONS.values():
        for field in dataclasses.fields(cls):
            if field.name in options and options[field.name] is not None:
                assert field.metadata["setting"] is options[field.name], field.name
                found += 1
    assert found == len([s for s in options.values() if s is not None])


NEW = Setting(3, "a setting added for the test", low=1, high=9, metavar="N")


@dataclass(frozen=True)
class _Options(EmbedOptions):
    """embed()'s options with one more setting, declared in one place."""

    retries: int = declared(NEW)


@dataclass(frozen=True)
class _Compute(ComputeSettings):
    retries: int = declared(NEW)


def test_a_setting_declared_in_one_place_reaches_the_cli_the_spec_and_embed(
    monkeypatch: pytest.MonkeyPatch, demo_cube_256: Any
) -> None:
    import importlib

    from xclay import cli

    embed_module = importlib.import_module("xclay.embed")
    monkeypatch.setattr(embed_module, "EmbedOptions", _Options)
    # the CLI: a flag with its type, bounds and help (default included)
    parser = cli._parser()
    args = parser.parse_args(["embed", "cube.zarr", "--out", "o", "--retries", "5"])
    help_text = next(
        a.help for a in _subparser(parser, "embed")._actions if "--retries" in a.option_strings
    )
    assert args.retries == 5 and help_text == "a setting added for the test (default 3)"
    with pytest.raises(SystemExit):
        parser.parse_args(["embed", "cube.zarr", "--out", "o", "--retries", "12"])
    assert flag_values(args, _Options)["retries"] == 5
    # the spec: read, checked, with the same words
    assert read_section(_Compute, {"retries": 7}, "compute").retries == 7
    with pytest.raises(ConfigError, match=r"compute\.retries: must be within \[1, 9\], got 0"):
        read_section(_Compute, {"retries": 0}, "compute")
    # embed(): a keyword it takes
    assert embed_module.EmbedOptions.of({"retries": 4}).retries == 4
    with pytest.raises(ConfigError, match="retries: must be within"):
        _Options(retries=10)
    # the docs' table
    assert "| `compute.retries` | `3` | a setting added for the test |" in markdown_rows(
        _Compute, "compute"
    )


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError(name)


def test_flags_are_made_with_their_declared_types_and_choices() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, EmbedOptions)
    args = parser.parse_args(["--batch-size", "auto", "--thumbnails", "--edges", "pad"])
    assert (args.batch_size, args.thumbnails, args.edges) == ("auto", 64, "pad")
    assert parser.parse_args(["--batch-size", "32"]).batch_size == 32
    for bad in (["--batch-size", "0"], ["--edges", "wrap"], ["--device", "gpu"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_spec_read_back_from_its_record_is_the_same_spec(tmp_path: Path) -> None:
    """A run records its spec (to_dict) and its tasks read it back (from_dict): the same
    spec, for a STAC input and for a datacube input."""
    from xclay.run.spec import RunSpec

    stac = {
        "name": "x",
        "input": {"stac": {"items": "items.json"}, "bands": ["red", "nir"], "bbox": [1, 2, 3, 4],
                  "datetime": "2024-01-01/2024-12-31", "wavelengths": {"red": 0.66, "nir": 0.84}},
        "grid": {"resolution": 10, "crs": 32633, "chip_size": 64, "stride": 32},
        "model": {"name": "rcf", "options": {"num_filters": 8}},
        "compute": {"batch_size": 4, "region_chips": 2},
        "quality": {"max_nodata": 0.2},
        "outputs": {"dir": "out", "thumbnails": True, "quantize": "int8"},
        "storage": {"region": "eu-west-1"},
    }  # fmt: skip
    cube = {"input": {"datacube": "cube.zarr"}, "outputs": {"dir": "out"}}
    for data in (stac, cube):
        spec = RunSpec.from_dict(data, base=str(tmp_path))
        again = RunSpec.from_dict(spec.to_dict(), base=str(tmp_path))
        assert again == spec
    assert RunSpec.from_dict(stac).grid.crs == "EPSG:32633"
    assert RunSpec.from_dict(stac).outputs.thumbnails == 64


def test_a_sections_api_docs_are_written_from_its_declarations() -> None:
    doc = inspect.getdoc(ComputeSettings) or ""
    for name, _, setting in settings_of(ComputeSettings):
        assert f"\n{name}\n    {setting.doc[:1].upper()}{setting.doc[1:40]}" in doc

    @dataclass(frozen=True)
    class Half:
        known: int = declared(Setting(1, "a declared setting"))
        unknown: int = 2

    with pytest.raises(TypeError, match="unknown is neither declared nor described"):
        documented()(Half)
    assert "unknown\n    what it is" in (documented(unknown="what it is")(Half).__doc__ or "")


def test_the_spec_knows_no_models_options() -> None:
    base = {"input": {"datacube": "cube.zarr"}, "outputs": {"dir": "out"}}
    spec = RunSpec.from_dict(
        {**base, "model": {"name": "clay-v1.5", "options": {"output": "mean"}}}
    )
    assert spec.model.encoder_options() == {"output": "mean"}
    assert "output" not in {name for name, _, _ in settings_of(ModelSettings)}
    with pytest.warns(DeprecationWarning, match="model.output is deprecated"):
        old = RunSpec.from_dict({**base, "model": {"name": "clay-v1.5", "output": "mean"}})
    assert old.model == spec.model
