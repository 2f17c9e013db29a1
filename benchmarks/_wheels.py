"""The GPU machine's wheel list (benchmarks/gpu_wheels.txt): read it, and check it.

    python benchmarks/_wheels.py declared          # xclay's own dependencies are covered
    python benchmarks/_wheels.py check .whl        # the downloaded wheels' whole closure
    python benchmarks/_wheels.py dedupe .whl       # keep the listed version of each

``declared`` needs nothing but this repository (the tests run it). ``check`` reads every
wheel's own requirements (markers evaluated for CPython 3.12 on x86-64 Linux, no
extras): each must be a wheel in the folder, at a version it accepts, or a package the
GPU image has (the ``# image:`` lines of the list), or one the list leaves out on purpose
(``# left out: NAME (why)``). ``dedupe`` removes, where the folder
holds several versions of one package (another tool's unpinned download beside this
list's), every version but the listed one: two versions stop the whole install.
"""

from __future__ import annotations

import re
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare Python: pip's own copy
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
LIST = HERE / "gpu_wheels.txt"
PYPROJECT = HERE.parent / "pyproject.toml"
# xclay's extras a GPU run uses (the core dependencies always).
EXTRAS = ("gpu-cu13", "dask")
# Provided by the image and not listed: torch's CUDA build comes with it.
ENVIRONMENT = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


@dataclass(frozen=True)
class WheelList:
    """The pinned requirements, the packages the image has, and the requirements left out
    on purpose (``# left out: NAME ...`` lines: each says why beside it)."""

    pins: dict[str, Requirement]
    image: frozenset[str]
    left_out: frozenset[str] = frozenset()

    @classmethod
    def read(cls, path: Path = LIST) -> WheelList:
        pins: dict[str, Requirement] = {}
        image: set[str] = set()
        left_out: set[str] = set()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            text = line.strip()
            if text.startswith("# image:"):
                image.update(canonicalize_name(p) for p in text.removeprefix("# image:").split())
            elif text.startswith("# left out:"):
                names = text.removeprefix("# left out:").split("(")[0].split()
                left_out.update(canonicalize_name(p) for p in names)
            elif text and not text.startswith("#"):
                req = Requirement(text)
                name = canonicalize_name(req.name)
                if name in pins:
                    raise ValueError(f"{path}:{n}: {req.name} is listed twice")
                if not str(req.specifier).startswith("=="):
                    raise ValueError(f"{path}:{n}: {text} is not pinned (NAME==VERSION)")
                pins[name] = req
        return cls(pins, frozenset(image), frozenset(left_out))

    def has(self, name: str) -> bool:
        return canonicalize_name(name) in self.pins or canonicalize_name(name) in self.image


def declared(wheels: WheelList, pyproject: Path = PYPROJECT) -> list[str]:
    """xclay's core and GPU-run dependencies that neither the list nor the image has."""
    project = tomllib.loads(pyproject.read_text())["project"]
    needed = list(project["dependencies"])
    for extra in EXTRAS:
        needed += [r for r in project["optional-dependencies"][extra] if "xclay[" not in r]
    problems = []
    for text in needed:
        req = Requirement(text)
        if not wheels.has(req.name):
            problems.append(f"xclay needs {text}: neither listed nor in the image")
        pin = wheels.pins.get(canonicalize_name(req.name))
        if pin is not None:
            version = str(pin.specifier).removeprefix("==")
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"xclay needs {text}; the list pins {pin}")
    return problems


def _wheel_name(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonicalize_name(name), version


def _requires(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.removeprefix("Requires-Dist:").strip())
            if req.marker is None or Marker(str(req.marker)).evaluate(ENVIRONMENT):
                out.append(req)
    return out


def check(folder: Path, wheels: WheelList) -> list[str]:
    """Problems of the wheels in ``folder``: a listed one missing, two versions of one
    package, or a requirement of any that nothing meets."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version = _wheel_name(path)
        found.setdefault(name, []).append(version)
    problems = [f"{n}: several versions {v}" for n, v in found.items() if len(v) > 1]
    for name, pin in wheels.pins.items():
        if not any(pin.specifier.contains(v, prereleases=True) for v in found.get(name, [])):
            problems.append(f"{pin}: no such wheel in {folder}")
    for path in sorted(folder.glob("*.whl")):
        for req in _requires(path):
            name = canonicalize_name(req.name)
            if name in found:
                if not any(req.specifier.contains(v, prereleases=True) for v in found[name]):
                    problems.append(f"{path.name} needs {req}; the wheels have {found[name]}")
            elif name not in wheels.image and name not in wheels.left_out:
                problems.append(f"{path.name} needs {req}: neither a wheel here nor in the image")
    return problems


def dedupe(folder: Path, wheels: WheelList) -> list[Path]:
    """Remove every wheel of a listed package but the listed version; the removed."""
    removed = []
    for path in sorted(folder.glob("*.whl")):
        name, version = _wheel_name(path)
        pin = wheels.pins.get(name)
        if pin is not None and not pin.specifier.contains(Version(version), prereleases=True):
            path.unlink()
            removed.append(path)
    return removed


# Parts of wheels a run never uses, left out to fit the device call's 64 MiB: nvCOMP's
# command-line tool (nvlzcat, 7.9 MB) and C headers.
SLIM = {"nvidia-libnvcomp-cu13": ("/bin/", "/include/")}


def slim(folder: Path) -> list[str]:
    """Rewrite the wheels of :data:`SLIM` without the parts it names (and without their
    lines in the wheel's RECORD); what was left out."""
    dropped = []
    for path in sorted(folder.glob("*.whl")):
        parts = SLIM.get(_wheel_name(path)[0])
        if not parts:
            continue
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if any(p in info.filename for p in parts):
                    dropped.append(info.filename)
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(
                        line for line in lines if not any(p in line.split(",")[0] for p in parts)
                    ).encode()
                dst.writestr(info, data, compresslevel=9)
        tmp.replace(path)
    return dropped


def main(argv: list[str]) -> int:
    wheels = WheelList.read()
    if argv[:1] == ["declared"]:
        problems = declared(wheels)
    elif argv[:1] == ["check"] and len(argv) == 2:
        problems = check(Path(argv[1]), wheels)
    elif argv[:1] == ["slim"] and len(argv) == 2:
        for name in slim(Path(argv[1])):
            print(f"left out {name}")
        return 0
    elif argv[:1] == ["dedupe"] and len(argv) == 2:
        for path in dedupe(Path(argv[1]), wheels):
            print(f"removed {path.name} (the list pins another version)")
        return 0
    else:
        print(__doc__)
        return 2
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{len(wheels.pins)} wheels listed: nothing missing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
