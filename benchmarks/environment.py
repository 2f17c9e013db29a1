"""What this machine is and has, as the first result of a GPU acceptance run.

Saves ``nvidia-smi -L`` and ``xclay info`` as they print, beside the context every result
carries (device name, driver, CUDA runtime, torch/CuPy/kvikIO/nvCOMP as imported) and
``xclay.environment.describe()`` (the GPU data path: kvikIO's mode and threads, GDS,
nvCOMP). Nothing is timed.

    python benchmarks/environment.py
    python benchmarks/environment.py --smoke      # the same: it takes seconds anyway
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from _common import context, parse, save


def _run(*command: str) -> dict[str, object]:
    if shutil.which(command[0]) is None and command[0] != sys.executable:
        return {"returncode": None, "output": f"{command[0]} not found"}
    out = subprocess.run(command, capture_output=True, text=True)
    return {"returncode": out.returncode, "output": (out.stdout + out.stderr).strip()}


def _info() -> dict[str, object]:
    """``xclay info`` as it prints, run in this process (no second interpreter to start)."""
    import contextlib
    import io

    from xclay.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli(["info"])
        except SystemExit as exit:
            code = exit.code
    return {"returncode": code, "output": out.getvalue().strip()}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parse(p, {})
    ctx = context()
    results = {"nvidia_smi": _run("nvidia-smi", "-L"), "xclay_info": _info()}
    cuda = ctx["device_name"] and not str(ctx["device_name"]).startswith("cpu")
    out = save("environment", {}, results, device="cuda" if cuda else "cpu")
    print(results["nvidia_smi"]["output"])
    print(results["xclay_info"]["output"])
    print(
        f"device {ctx['device_name']}, driver {ctx['driver']}, CUDA runtime {ctx['cuda_runtime']}; "
        + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items())
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
