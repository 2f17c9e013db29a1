"""The gpu tests (``pytest -m gpu``, the project's own settings: warnings are errors), run
and saved as a result: how many passed, failed, errored and were skipped, and each
failure's and skip's reason.

    python benchmarks/gpu_tests.py
    python benchmarks/gpu_tests.py --smoke      # one test module (on a CPU: all skipped)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from _common import ROOT, parse, save


def summary(junit: Path) -> dict[str, Any]:
    """Counts and reasons from pytest's JUnit XML."""
    out: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "problems": []}
    skips: dict[str, int] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            kind = "failure" if "failure" in kinds else "error"
            out["failed" if kind == "failure" else "errors"] += 1
            message = (kinds[kind].get("message") or kinds[kind].text or "").strip()
            out["problems"].append({"test": name, "kind": kind, "message": message[:2000]})
        elif "skipped" in kinds:
            out["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "").strip()
            skips[reason] = skips.get(reason, 0) + 1
        else:
            out["passed"] += 1
    out["skip_reasons"] = skips
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("paths", nargs="*", default=[], help="test paths (default: the suite)")
    args = parse(p, {"paths": ["tests/batch/test_gpu_engine.py"]})
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu",
                   "-rfE", "--tb=short", "-q", f"--junitxml={junit}", *args.paths]  # fmt: skip
        start = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT)
        seconds = time.perf_counter() - start
        results = summary(junit) if junit.is_file() else {"problems": ["no JUnit XML written"]}
    results |= {"returncode": run.returncode, "seconds": round(seconds, 1)}
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = save("gpu_tests", {"command": command[1:], "paths": args.paths}, results, device=device)
    print(
        f"gpu tests: {results.get('passed')} passed, {results.get('failed')} failed, "
        f"{results.get('errors')} errors, {results.get('skipped')} skipped; saved {out}"
    )
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
