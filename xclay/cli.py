"""The ``xclay`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, get_args

from xclay._progress import LOG_EVERY
from xclay._version import __version__
from xclay.errors import ConfigError, OutputExistsError, XClayError
from xclay.outputs.formats import (
    DEFAULT_FORMAT,
    check_options,
    export_formats,
    export_options,
    get_exporter,
)
from xclay.quality import SKIP_REASONS, QualityFilter
from xclay.run.spec import ComputeSettings, OutputSettings
from xclay.settings import add_flags, flag_values
from xclay.storage import Location, is_url, location, use_storage_options

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xclay`` command line.

    Parameters
    ----------
    argv
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 done, 1 an error (one line on stderr; the traceback with
        ``-v``), 2 a usage mistake, 130 interrupted.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("asyncio").addFilter(_quiet_abandoned_reads)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        with use_storage_options(getattr(args, "storage_option", None) or {}):
            result: int = args.func(args)
        return result
    except XClayError as err:
        _explain(args, str(err))
        return 1
    except BrokenPipeError:  # the reader went away (xclay info | head): nothing to say
        sys.stderr.close()
        return 0
    except OSError as err:  # disk full, read-only or missing folders, unreachable files
        _explain(args, _os_error(err, args.command))
        return 1
    except KeyboardInterrupt:
        print(f"xclay {args.command}: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except Exception as err:  # a case xclay does not word yet: still one line, and a way on
        _explain(
            args,
            f"unexpected {type(err).__name__}: {err} (rerun with -v for the traceback; "
            "please report it)",
        )
        return 1


def _quiet_abandoned_reads(record: logging.LogRecord) -> bool:
    """When one read of a Zarr store fails, zarr's event loop drops the reads still in
    flight; at exit asyncio logs each as "Task was destroyed but it is pending". The
    error was already said in one line: these are noise (kept with ``-v``)."""
    return not str(record.msg).startswith("Task was destroyed but it is pending")


def _explain(args: argparse.Namespace, message: str) -> None:
    """One line on stderr; the traceback only with ``-v``."""
    if args.verbose:
        import traceback

        traceback.print_exc()
    print(f"xclay {args.command}: error: {message}", file=sys.stderr)


def _os_error(err: OSError, command: str) -> str:
    """An operating-system error, worded for what it is: a full disk, a permission, a path
    that does not exist; only commands that write regions can be resumed."""
    import errno

    if err.errno is None:  # raised by xclay with its own wording (which names the fix)
        return str(err)
    where = f" ({err.filename})" if err.filename else ""
    what = err.strerror or str(err)
    resumes = command in ("run", "ingest", "embed")
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "Free space (or raise the quota) on the output folder's disk"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "Check the permissions of that path (outputs need a writable folder)"
    elif err.errno in (errno.ENOENT, errno.ENOTDIR):
        advice = "Check that the path exists"
    else:
        advice = "Check the path and the disk"
    tail = "; nothing unfinished was marked complete, and rerunning resumes" if resumes else ""
    return f"{what}{where}. {advice}{tail}."


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xclay",
        description="Satellite imagery composites -> foundation-model embeddings (Zarr + GeoParquet).",
    )
    parser.add_argument("--version", action="version", version=f"xclay {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser(
        "demo",
        help="embed the built-in demo composite (no download) and write every output",
        description=(
            "Build the synthetic Sentinel-2 demo composite, write it as a datacube, embed it, and "
            "write embeddings.zarr, embeddings.parquet and preview.png."
        ),
    )
    demo.add_argument(
        "--out", default="xclay-demo", help="output folder or URL (default: ./xclay-demo)"
    )
    demo.add_argument(
        "--size",
        type=_at_least(16),
        default=2048,
        help="scene edge in pixels, at least 16 (default 2048 = 20.5 km)",
    )
    demo.add_argument(
        "--seed", type=_at_least(0), default=0, help="seed of the synthetic scene (default 0)"
    )
    _add_embed_options(demo)
    _add_storage_option(demo)
    demo.set_defaults(func=_demo)

    run = sub.add_parser(
        "run",
        help="run a spec: STAC -> datacube -> embeddings -> GeoParquet",
        description="Ingest, embed and export as a run spec (YAML) says; see docs/run-spec.md.",
    )
    run.add_argument("spec", help="run spec (YAML): a path or URL")
    run.add_argument("--dry-run", action="store_true", help="print the plan; read no pixels")
    run.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_progress_options(run)
    _add_cluster_options(run)
    _add_storage_option(run)
    _add_gdal_option(run)
    run.set_defaults(func=_run)

    ing = sub.add_parser("ingest", help="run a spec's first step: STAC -> datacube Zarr")
    ing.add_argument("spec", help="run spec (YAML): a path or URL")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing datacube")
    _add_progress_options(ing)
    _add_cluster_options(ing)
    _add_storage_option(ing)
    _add_gdal_option(ing)
    ing.set_defaults(func=_ingest)

    emb = sub.add_parser(
        "embed",
        help="embed a datacube Zarr (or a spec's datacube); write the embeddings",
        description=(
            "With a datacube Zarr: embed it and write embeddings.zarr and embeddings.parquet in "
            "--out. With a run spec (YAML): run its embed step (the embeddings Zarr); the spec's "
            "model, grid and quality settings apply and the options below are ignored."
        ),
    )
    emb.add_argument("target", help="datacube Zarr (a path or URL), or a run spec (YAML)")
    emb.add_argument("--out", default=None, help="output folder or URL (datacube mode)")
    emb.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_embed_options(emb)
    add_flags(emb, ComputeSettings, names=["region_chips"])
    _add_cluster_options(emb)
    _add_storage_option(emb)
    emb.set_defaults(func=_embed)

    exp = sub.add_parser(
        "export",
        help="embeddings Zarr (or a spec's) -> GeoParquet, COG, ... (--format)",
        description=(
            "Write an embeddings Zarr, or every embeddings Zarr of a finished run (its spec), "
            "in an output format: "
            + "; ".join(f"{name}: {get_exporter(name).summary}" for name in export_formats())
            + "."
        ),
    )
    exp.add_argument("target", help="embeddings Zarr (a path or URL), or a run spec (YAML)")
    exp.add_argument(
        "--format",
        choices=export_formats(),
        default=DEFAULT_FORMAT,
        help=f"output format (default {DEFAULT_FORMAT})",
    )
    exp.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path (default: beside the Zarr; for a spec, the run's folder)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    for name, option in export_options().items():
        exp.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"export_{name}",
            default=option.default,
            type=option.type,
            choices=option.choices,
            metavar=option.metavar,
            help=option.help,
        )
    _add_storage_option(exp)
    exp.set_defaults(func=_export)

    _add_map_commands(sub)

    info = sub.add_parser("info", help="versions, CPU/GPU, optional parts available")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    return parser


def _add_progress_options(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar, no progress lines")
    p.add_argument(
        "--log-every",
        type=float,
        default=LOG_EVERY,
        metavar="S",
        help="without a terminal (a batch job's log): a progress line every S seconds "
        f"(default {LOG_EVERY:g})",
    )


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        default=None,
        metavar="local:N",
        help="run regions on a local Dask cluster of N workers",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run regions on an existing Dask cluster",
    )


INCOMPLETE = 3  # exit code: the run finished, but some regions failed


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    """The embedding's flags, from the settings' declarations (xclay.settings)."""
    from xclay.embed import EmbedOptions

    p.add_argument("--model", default="rcf", help="registry name (default rcf; see xclay info)")
    p.add_argument(
        "--checkpoint", default=None, help="weights / fitted filters for --model (path or URL)"
    )
    p.add_argument(
        "--model-option",
        type=_model_option,
        action=_Merge,
        default={},
        metavar="NAME=VALUE",
        help="one of the model's own options, checked by the model (a YAML value), e.g. "
        "num_filters=256 for rcf or output=patches for clay-v1.5; repeat for more (default: none, "
        "the model's defaults)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="deprecated: --model-option output=VALUE",
    )
    stored = ("thumbnails", "loss")
    add_flags(p, EmbedOptions, exclude=stored)  # every other setting of embed(), declared
    filters = p.add_argument_group(
        "chip filters", "fractions 0..1; the class filters need a cube with quality classes"
    )
    add_flags(filters, QualityFilter)
    _add_progress_options(p)
    group = p.add_argument_group("what each chip stores")
    add_flags(group, OutputSettings, names=["quantize"])
    add_flags(group, EmbedOptions, names=stored)


def _add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        type=_storage_option,
        action=_Merge,
        default={},
        metavar="KEY=VALUE",
        help="a setting for object storage (s3://, gs://, az://) beyond the environment, "
        "e.g. endpoint=http://127.0.0.1:9000 or skip_signature=true; repeat for more "
        "(default: none, the environment's)",
    )


def _add_gdal_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gdal-option",
        type=_storage_option,
        action=_Merge,
        default={},
        metavar="KEY=VALUE",
        help="a GDAL setting for reading the STAC items' images (over xclay's cloud "
        "defaults), e.g. GDAL_HTTP_MAX_RETRY=20; repeat for more (default: none)",
    )


def _model_option(text: str) -> dict[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value  # not YAML: the text itself
    return {key.strip(): parsed}


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model's options from ``--model-option`` (and the deprecated ``--output``)."""
    options = dict(args.model_option)
    if args.output is not None:
        print(
            "xclay: --output is deprecated; write --model-option output=" + args.output,
            file=sys.stderr,
        )
        options.setdefault("output", args.output)
    return options


def _storage_option(text: str) -> dict[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
    return {key.strip(): parsed}


class _Merge(argparse.Action):
    """Collects repeated KEY=VALUE options into one mapping."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, {**getattr(namespace, self.dest, {}), **values})


def _at_least(low: int) -> Any:
    """An argparse type: a whole number no smaller than ``low``."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    whole.__name__ = f"whole number >= {low}"
    return whole


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (what and where to look), like every
    other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _embed_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """embed()'s keywords from the flags: the model, and every declared setting."""
    from xclay.embed import EmbedOptions
    from xclay.models import get_model

    model: Any = args.model
    checkpoint = args.checkpoint
    options = _model_options(args)
    if options:  # the model's own options: build the encoder here
        model = get_model(args.model, checkpoint=checkpoint, **options)
        checkpoint = None
    settings = flag_values(args, EmbedOptions)
    settings["quality"] = QualityFilter(**flag_values(args, QualityFilter))
    return {
        "model": model,
        "checkpoint": checkpoint,
        "progress": False if args.no_progress else None,
        **settings,
    }


def _demo(args: argparse.Namespace) -> int:
    from xclay.datacube import open_datacube, write_datacube
    from xclay.datasets import demo_composite
    from xclay.explore.viz import save_preview

    started = time.perf_counter()
    out = location(args.out)
    _refuse_foreign_folder(out)
    out.mkdir()
    cube = demo_composite(args.size, seed=args.seed)
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    gsd = cube.attrs["gsd"]
    print(
        f"xclay demo: synthetic Sentinel-2 L2A annual composite, {ny} x {nx} px "
        f"({ny * gsd / 1000:.1f} x {nx * gsd / 1000:.1f} km at {gsd:g} m), Amazon basin (EPSG:32720)"
    )
    cube_path = write_datacube(cube, out / "cube.zarr", chip_size=args.chip_size, overwrite=True)
    print(f"  datacube    {cube_path}")
    cube = open_datacube(cube_path)
    emb = _embed_and_export(cube, out, args, overwrite=True)
    with (out / "preview.png").staged(overwrite=True) as preview:
        save_preview(cube, emb, preview)
    print(f"  preview     {out / 'preview.png'}  (true colour | PCA of the embeddings)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


DEMO_OUTPUTS = ("cube.zarr", "embeddings.zarr", "embeddings.parquet", "preview.png")


def _refuse_foreign_folder(out: Location) -> None:
    """The demo replaces its own earlier outputs (rerunning it is normal) and nothing
    else: a folder holding anything the demo does not write, or a datacube that is not
    the demo's, is refused before anything is touched."""
    if out.is_file():
        raise OutputExistsError(f"{out} is a file, not a folder; choose another --out.")
    if not out.is_dir():
        return
    foreign = sorted(
        entry.name
        for entry in out.iterdir()
        if entry.name not in DEMO_OUTPUTS and ".partial-" not in entry.name
    )
    cube = out / "cube.zarr"
    if not foreign and cube.exists() and not _is_demo_cube(cube):
        foreign = ["cube.zarr (not the demo's datacube)"]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{out} holds outputs the demo did not write ({shown}); the demo would replace "
            "some and leave the rest inconsistent. Choose another --out. Nothing was written."
        )


def _is_demo_cube(path: Location) -> bool:
    try:
        attrs = json.loads((path / "zarr.json").read_bytes()).get("attributes", {})
    except (OSError, ValueError):
        return False
    generator = str((attrs.get("provenance") or {}).get("generator", ""))
    return generator.startswith("xclay.datasets.demo_composite(")


def _is_spec(path: str) -> bool:
    return path.rstrip("/").endswith((".yaml", ".yml"))


def _spec(args: argparse.Namespace) -> Any:
    import dataclasses

    from xclay.run import load_spec

    spec = load_spec(args.spec if hasattr(args, "spec") else args.target)
    if getattr(args, "overwrite", False):
        spec = dataclasses.replace(spec, outputs=dataclasses.replace(spec.outputs, overwrite=True))
    if getattr(args, "storage_option", None):
        spec = dataclasses.replace(spec, storage={**spec.storage, **args.storage_option})
    if getattr(args, "gdal_option", None):
        spec = dataclasses.replace(spec, gdal={**spec.gdal, **args.gdal_option})
    return spec


def _progress(args: argparse.Namespace) -> dict[str, Any]:
    """The progress keywords of the run functions: a bar on a terminal, lines at the
    interval asked for in a log, nothing with --no-progress."""
    return {
        "progress": False if getattr(args, "no_progress", False) else None,
        "log_every": getattr(args, "log_every", LOG_EVERY),
    }


@contextlib.contextmanager
def _client(args: argparse.Namespace, spec: Any) -> Iterator[tuple[Any, int | None]]:
    """The Dask client the options ask for (None: in this process) and the torch threads
    a local run uses; the client is closed after, whatever happens."""
    from xclay.run import client_for

    if not args.verbose and (getattr(args, "cluster", None) or getattr(args, "scheduler", None)):
        with contextlib.suppress(ImportError):
            import distributed  # noqa: F401  (its import sets its loggers to INFO)
        # The cluster's own chatter (start, workers, close) only with -v.
        logging.getLogger("distributed").setLevel(logging.WARNING)
    client, threads = client_for(
        getattr(args, "cluster", None), getattr(args, "scheduler", None), spec.compute.device
    )
    try:
        yield client, threads
    finally:
        if client is not None:
            if not args.verbose:  # a worker slow to stop is killed: expected, not news
                logging.getLogger("distributed").setLevel(logging.ERROR)
            local = getattr(args, "cluster", None) is not None
            cluster = getattr(client, "cluster", None) if local else None
            client.close()
            if cluster is not None:  # ours: stopped now, not by an exit handler later
                cluster.close()


def _finish(report: Any, retry: str = "rerun the same spec") -> int:
    print(report.describe(retry=retry))
    return 0 if report.status == "complete" else INCOMPLETE


def _run(args: argparse.Namespace) -> int:
    from xclay.run import plan, run

    spec = _spec(args)
    print(f"xclay run {args.spec}" + (f" ({spec.name})" if spec.name else ""))
    if args.dry_run:
        from xclay.run.phases import check_start
        from xclay.run.preflight import preflight

        resolved = plan(spec)
        print(resolved.describe())
        preflight(spec, resolved, dry_run=True)
        resumes = check_start(spec, resolved)
        print("  preflight   model, checkpoint, output folder and free space: ok")
        if resumes:
            print(f"  resumes     the run of this spec in {spec.outdir}: its finished regions kept")
        print("dry run: no pixel read, nothing written")
        return 0
    resolved = plan(spec)
    print(resolved.describe(), flush=True)  # first: a batch job's log says what it runs
    with _client(args, spec) as (client, threads):
        report = run(
            spec,
            client=client,
            torch_threads=threads,
            resolved=resolved,
            **_progress(args),
        )
    return _finish(report)


def _ingest(args: argparse.Namespace) -> int:
    from xclay.run import ingest, plan

    spec = _spec(args)
    resolved = plan(spec)
    print(resolved.describe(), flush=True)
    with _client(args, spec) as (client, _):
        report = ingest(spec, client=client, resolved=resolved, **_progress(args))
    print(f"  datacube    {spec.datacube_path}")
    return 0 if report.status == "complete" else _finish(report)


def _embed(args: argparse.Namespace) -> int:
    from xclay.datacube import open_datacube

    if _is_spec(args.target):
        from xclay.run import embed_step

        spec = _spec(args)
        with _client(args, spec) as (client, _):
            report = embed_step(spec, client=client, **_progress(args))
        return _finish(report)
    if args.out is None:
        print("xclay embed: error: --out is required with a datacube Zarr", file=sys.stderr)
        return 2
    # A run of its own over the datacube: region by region, with markers, so a killed
    # embed resumes (rerun the same command) and loses at most the regions in flight.
    from xclay.run import RunSpec, plan, run

    open_datacube(args.target)  # refuses a missing or incomplete datacube before anything
    spec = RunSpec.from_dict(_embed_spec(args), source="command-line options", base=str(Path.cwd()))
    resolved = plan(spec)
    print(f"xclay embed {args.target} -> {args.out}")
    print(resolved.describe(), flush=True)
    with _client(args, spec) as (client, threads):
        report = run(
            spec, client=client, torch_threads=threads, resolved=resolved, **_progress(args)
        )
    return _finish(report, retry="rerun the same xclay embed command")


def _embed_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The run spec ``xclay embed CUBE --out DIR [options]`` stands for: each flag in the
    section that declares its setting."""
    from xclay.run.spec import SECTIONS

    model: dict[str, Any] = {"name": args.model}
    if args.checkpoint:
        model["checkpoint"] = _absolute(args.checkpoint)
    options = _model_options(args)
    if options:
        model["options"] = options
    spec: dict[str, Any] = {
        "input": {"datacube": _absolute(args.target)},
        "model": model,
        "storage": dict(args.storage_option),
        "outputs": {"dir": _absolute(args.out)},
    }
    for section in ("grid", "compute", "quality", "outputs"):
        spec.setdefault(section, {}).update(flag_values(args, SECTIONS[section]))
    return spec


def _export(args: argparse.Namespace) -> int:
    exporter = get_exporter(args.format)
    given = {name: getattr(args, f"export_{name}") for name in export_options()}
    try:
        options = check_options(exporter, given)
    except ConfigError as err:  # a usage mistake, as argparse reports them
        print(f"xclay export: error: {err}", file=sys.stderr)
        return 2
    if _is_spec(args.target):
        from xclay.run import export_step

        written = export_step(
            _spec(args), exporter.name, out=args.out, overwrite=args.overwrite, **options
        )
    else:
        target = location(args.target)
        out = args.out or str(target.with_suffix(exporter.suffix))
        written = list(exporter.write(args.target, out, overwrite=args.overwrite, **options))
        if (target.parent / "_xclay" / "run.json").is_file():
            # A store of a run: the run's STAC description lists what was exported.
            from xclay.run.catalog import write_catalog

            written.append(str(write_catalog(target.parent)))
    for path in written:
        kind = "stac" if str(path).endswith(".json") else exporter.name
        print(f"  {kind:<10}  {path}")
    return 0


def _absolute(where: str) -> str:
    """A path made absolute (a spec written for the command is read from elsewhere); a
    URL as it is."""
    return where if is_url(where) else str(Path(where).expanduser().resolve())


def _embed_and_export(
    cube: Any, out: Location, args: argparse.Namespace, *, overwrite: bool
) -> Any:
    from xclay.embed import embed
    from xclay.outputs.export import to_geoparquet, to_zarr

    t0 = time.perf_counter()
    emb = embed(cube, **_embed_kwargs(args))
    seconds = time.perf_counter() - t0
    run = emb.attrs["run"]
    card = emb.attrs["model"]
    done = run["chips_embedded"]
    data_path = emb.attrs["data_path"]
    print(
        f"  embedded    {done} of {run['chips_total']} chips with {card['name']} "
        f"({card['dim']}-d) on {data_path['device']} in {seconds:.1f} s: "
        f"{done / max(seconds, 1e-9):.1f} chips/s"
    )
    if data_path["fallbacks"]:
        print("  data path   " + "; ".join(data_path["fallbacks"]))
    skipped = {
        reason: run[f"chips_skipped_{reason}"]
        for reason in SKIP_REASONS
        if run.get(f"chips_skipped_{reason}")
    }
    if run["chips_failed"]:
        skipped["no valid window"] = run["chips_failed"]
    if skipped:
        print("  skipped     " + ", ".join(f"{n} ({why})" for why, n in skipped.items()))
    zarr_path = to_zarr(emb, out / "embeddings.zarr", quantize=args.quantize, overwrite=overwrite)
    print(f"  embeddings  {zarr_path}")
    pq_path = to_geoparquet(
        emb, out / "embeddings.parquet", quantize=args.quantize, overwrite=overwrite
    )
    print(f"  geoparquet  {pq_path}  ({done} row{'' if done == 1 else 's'})")
    return emb


def _info(args: argparse.Namespace) -> int:
    from xclay.environment import describe
    from xclay.models import get_model_info, list_models

    info = describe()
    info["models"] = {name: get_model_info(name).description for name in list_models()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"xclay {info['xclay']}  (Python {info['python']}, {info['platform']})")
    cpu = info["cpu"]
    bf16 = (
        "AMX-BF16" if cpu["amx_bf16"] else ("AVX512-BF16" if cpu["avx512_bf16"] else "no fast bf16")
    )
    print(f"CPU     {cpu['model']}, {cpu['cores']} cores, {bf16}; memory {info['memory_gib']} GiB")
    gpu = info["gpu"]
    if gpu.get("cuda"):
        for d in gpu["devices"]:
            print(f"GPU     {d['name']} ({d['memory_gib']} GiB, sm {d['capability']})")
    else:
        build = gpu.get("torch_cuda_build") or "CPU-only build"
        print(f"GPU     none usable (torch: {build})")
    print("GPU I/O " + _data_path_line(gpu.get("data_path", {})))
    missing = info.get("missing", {})
    print(
        "parts   "
        + ", ".join(
            f"{k}: yes" if v else f"{k}: no ({' and '.join(missing.get(k, []))} missing)"
            for k, v in info["optional"].items()
        )
    )
    print("models  " + ", ".join(info["models"]))
    print("versions")
    for name, version in info["packages"].items():
        print(f"  {name:20s} {version}")
    return 0


def _data_path_line(status: dict[str, Any]) -> str:
    """kvikIO's mode and threads and nvCOMP, as one line of `xclay info`."""
    kvikio = status.get("kvikio")
    if not kvikio:
        text = "kvikio not installed (engine='kvikio' needs xclay[gpu])"
    elif "error" in kvikio:
        text = f"kvikio unusable: {kvikio['error']}"
    else:
        mode = kvikio.get("compat_mode")
        gds = kvikio.get("gds", "unknown")
        text = (
            f"kvikio {kvikio.get('version')}: compat_mode {mode}, GDS {gds}, "
            f"{kvikio.get('num_threads')} threads"
        )
    nvcomp = status.get("nvcomp")
    text += f"; nvCOMP {nvcomp}" if nvcomp else "; nvCOMP not installed (zstd decodes on the host)"
    if not status.get("cuda"):
        text += "; no CUDA device"
    return text


# --------------------------------------------------------------------------- maps (issue 26)


def _add_map_commands(sub: Any) -> None:
    """``xclay fit`` and ``xclay predict``: labels to a checked model, a model to a map."""
    from xclay.apply.labels import JoinRule
    from xclay.apply.model import ModelKind

    fit = sub.add_parser(
        "fit",
        help="fit a model from labels to embeddings, checked by spatial cross-validation",
        description=(
            "Join labels (points or polygons: GeoParquet, GeoJSON, GeoPackage, Shapefile; or a "
            "label raster: GeoTIFF; any CRS) to the chips of an embeddings Zarr, fit a model and "
            "check it by spatial block cross-validation; write the model (JSON, with its "
            "scores, beside its weights) and print the scores."
        ),
    )
    fit.add_argument("labels", help="the labels file (a path or URL)")
    fit.add_argument("--embeddings", required=True, help="embeddings Zarr (a path or URL)")
    fit.add_argument("--column", default=None, help="the label column (points and polygons)")
    fit.add_argument(
        "--model", choices=get_args(ModelKind), default="linear", help="model (default linear)"
    )
    fit.add_argument(
        "--rule", choices=get_args(JoinRule), default="auto", help="join rule (default auto)"
    )
    fit.add_argument(
        "--min-cover",
        type=_fraction,
        default=0.5,
        help="polygons and rasters: share of a chip the label must cover (default 0.5)",
    )
    fit.add_argument("--folds", type=_at_least(2), default=5, help="folds (default 5)")
    fit.add_argument(
        "--block-m",
        type=float,
        default=None,
        help="block edge in metres (default: the labels' autocorrelation range)",
    )
    fit.add_argument("--time", type=_at_least(0), default=None, help="time step (index)")
    fit.add_argument("--seed", type=_at_least(0), default=0, help="seed (default 0)")
    fit.add_argument("--out", default="model.json", help="model file (default ./model.json)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    _add_storage_option(fit)
    fit.set_defaults(func=_fit)

    pred = sub.add_parser(
        "predict",
        help="predict a model over an embeddings Zarr: map COGs, STAC item, PNG",
        description=(
            "Predict a fitted model (xclay fit) over every chip of an embeddings Zarr, in "
            "blocks, and write the class map (or values) and per-class probabilities as "
            "Cloud-Optimized GeoTIFFs on the chip grid, a STAC item and a PNG preview."
        ),
    )
    pred.add_argument("model", help="model file (JSON, from xclay fit)")
    pred.add_argument("embeddings", help="embeddings Zarr (a path or URL)")
    pred.add_argument("--out", default="map.tif", help="map GeoTIFF (default ./map.tif)")
    pred.add_argument("--time", type=_at_least(0), default=None, help="time step (index)")
    pred.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto"
    )
    pred.add_argument(
        "--block-mb",
        type=_at_least(1),
        default=256,
        help="vectors read at a time (MB; default: 256)",
    )
    pred.add_argument("--overwrite", action="store_true", help="replace existing files")
    _add_storage_option(pred)
    pred.set_defaults(func=_predict)


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within (0, 1], got {value}")
    return value


def _fit(args: argparse.Namespace) -> int:
    from xclay.apply import fit, join_labels
    from xclay.outputs.export import open_embeddings

    emb = open_embeddings(args.embeddings)
    labels = join_labels(
        emb, args.labels, column=args.column, rule=args.rule, min_cover=args.min_cover
    )
    dropped = ", ".join(f"{n} {why}" for why, n in labels.dropped.items() if n)
    print(
        f"  labels      {len(labels)} chips by rule {labels.rule}"
        + (f" ({dropped})" if dropped else "")
    )
    model = fit(
        emb,
        labels,
        model=args.model,
        folds=args.folds,
        block_m=args.block_m,
        time=args.time,
        seed=args.seed,
    )
    cv = model.scores["cv"]
    print(
        f"  model       {model.kind} {model.params}, "
        + (f"{len(model.classes)} classes" if model.classes else "values")
    )
    print(
        f"  checked     {cv['folds']}-fold spatial CV, blocks of {cv['block_m']:.0f} m: {cv['rule']}"
    )
    oof = model.scores["out_of_fold"]
    if model.classes is not None:
        print(f"  scores      accuracy {oof['accuracy']:.3f}, macro F1 {oof['macro_f1']:.3f}")
        for name, row in oof["per_class"].items():
            print(f"    {name:<16} F1 {row['f1']:.3f}  ({row['support']} chips)")
    else:
        print(f"  scores      R2 {oof['r2']:.3f}, RMSE {oof['rmse']:.4g}, MAE {oof['mae']:.4g}")
    path = model.save(args.out, overwrite=args.overwrite)
    print(f"  model file  {path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from xclay.apply import predict, write_map

    t0 = time.perf_counter()
    prediction = predict(
        args.embeddings, args.model, time=args.time, device=args.device, block_mb=args.block_mb
    )
    seconds = time.perf_counter() - t0
    chips = prediction.sizes["chip_y"] * prediction.sizes["chip_x"]
    print(f"  predicted   {chips} chips in {seconds:.1f} s")
    files = write_map(prediction, args.out, model=args.model, overwrite=args.overwrite)
    for kind, path in (
        ("map", files.map),
        ("probability", files.probability),
        ("stac", files.stac),
        ("preview", files.preview),
    ):
        if path is not None:
            print(f"  {kind:<11} {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
