"""Where a run's regions run: a Dask cluster (local or any scheduler), set up for xclay.

Workers get their share of the cores and no glibc malloc tuning (it made small
torch ops 10x slower in a worker; ``benchmarks/worker_environment.py``), and
import the heavy modules once, in parallel, before the first task.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from xclay.run.spec import SpecError

__all__ = ["client_for", "warm_workers"]

log = logging.getLogger(__name__)

# No dashboard, and the scheduler's HTTP server (metrics, health), which Dask starts on
# port 8787 even without one, on a free port: two runs on one machine do not collide.
NO_DASHBOARD: dict[str, Any] = {
    "dashboard_address": None,
    "scheduler_kwargs": {"dashboard_address": ":0"},
}


def client_for(
    cluster: str | None, scheduler: str | None, device: str, *, threads: int | None = None
) -> tuple[Any, int | None]:
    """A Dask client for ``--cluster local:N`` or ``--scheduler ADDRESS``, and the torch threads
    each task should use.

    Parameters
    ----------
    cluster
        ``"local:N"``: a local cluster of N worker processes (on a GPU device, with
        dask-cuda installed, one worker per GPU, at most N). ``None``: no local cluster.
    scheduler
        The address of a running Dask scheduler to connect to; it takes precedence over
        ``cluster``. ``None``: none.
    device
        The run's ``compute.device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``);
        anything but ``"cpu"`` asks for a GPU cluster when there is a GPU.
    threads
        Torch threads per task on a local CPU cluster; default the cores shared among
        the workers.

    Returns
    -------
    tuple
        The client and the torch threads per task (``None``: the workers' own);
        ``(None, None)`` when neither ``cluster`` nor ``scheduler`` is given (run in
        this process).
    """
    if cluster is None and scheduler is None:
        return None, None
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        from xclay.errors import MissingDependencyError

        raise MissingDependencyError(
            "--cluster and --scheduler need Dask's distributed scheduler (the 'distributed' "
            'package), which is not installed here: pip install "xclay[dask]"'
        ) from err
    if scheduler is not None:
        return Client(scheduler), None
    assert cluster is not None
    kind, _, count = cluster.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise SpecError(f"--cluster must be local:N (N workers), got {cluster!r}.")
    workers = int(count)
    if device != "cpu":
        try:
            import torch
            from dask_cuda import LocalCUDACluster

            if torch.cuda.is_available():
                gpus = min(workers, torch.cuda.device_count())
                cuda = LocalCUDACluster(n_workers=gpus, **NO_DASHBOARD)
                return Client(cuda), None
        except ImportError:
            log.info("dask-cuda is not installed; a CPU LocalCluster is used")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    _worker_environment(threads)
    cluster_obj = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, **NO_DASHBOARD
    )
    return Client(cluster_obj), threads


def _worker_environment(threads: int) -> None:
    """What Dask puts in a new worker's environment (kept for the workers it restarts).

    Dask sets OMP/MKL/OpenBLAS to 1 thread and MALLOC_TRIM_THRESHOLD_; setting any glibc
    malloc threshold turns off glibc's adaptive mmap threshold, so every large temporary
    is mapped and page-faulted anew: small torch ops ran 10x slower in a worker than in a
    plain process (benchmarks/scaling.py, docs/hpc.md). Give workers their share of the
    cores and leave malloc alone.
    """
    import dask

    dask.config.set(
        {
            "distributed.nanny.pre-spawn-environ": {
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "OPENBLAS_NUM_THREADS": threads,
            }
        }
    )
    # A nanny leaves the variables it set in this process's environment, where later
    # workers (restarted ones too) would inherit them: take it out.
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)


def warm_workers(client: Any) -> None:
    """Import the heavy modules on every worker now, in parallel, rather than in each
    worker's first task.

    Parameters
    ----------
    client
        A Dask ``distributed`` client (as :func:`client_for` returns); each of its
        workers imports odc-stac, torch and xclay's ingest, embed and task modules.
    """
    client.run(_import_task_modules)


def _import_task_modules() -> None:
    import odc.stac  # noqa: F401
    import torch  # noqa: F401

    import xclay.embed
    import xclay.ingest
    import xclay.run.tasks  # noqa: F401
