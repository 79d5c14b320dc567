"""Where a sweep's tasks run: a local process pool (default), this process (`serial`, for
debugging), or a Ray cluster (`ray`, optional dependency). All three give the sweep the same
four calls: submit, wait for any, result, share a trace file with the workers.

GPUs: each local worker is pinned to one GPU (CUDA_VISIBLE_DEVICES, set before CUDA starts in the
spawned process), so `--device auto` or `cuda` in a run means that worker's GPU; on Ray, a task
that runs a model (`fn.runs_model`) requests one GPU when the cluster has any."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from pathlib import Path

from dipstream.errors import DipstreamError

EXECUTORS = ("local", "serial", "ray")


class WorkerDied(Exception):
    """The process running a task vanished (killed, out of memory)."""


def die_with_parent(parent: int) -> None:
    """Pool worker initializer: exit as soon as the sweep process `parent` is gone (killed with
    SIGKILL included), instead of waiting forever on the pool's pipes. A daemon thread polls the
    parent pid; on Linux the kernel also sends SIGKILL when the parent dies (PR_SET_PDEATHSIG)."""
    import threading
    import time

    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="dipstream-die-with-parent", daemon=True).start()


def init_worker(parent: int, gpu_queue=None) -> None:
    """Pool worker initializer: die with the parent and take one GPU index from `gpu_queue`."""
    die_with_parent(parent)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class LocalExecutor:
    """A pool of `jobs` fresh Python processes (spawned, so no torch state is forked) that exit
    when the sweep process does; with `gpus`, worker i is pinned to GPU i mod gpus."""

    def __init__(self, jobs: int, gpus: int = 0):
        self.jobs, self.gpus = jobs, gpus
        self.threads = max(1, (os.cpu_count() or 1) // jobs)  # torch threads of a model run
        ctx = multiprocessing.get_context("spawn")
        queue = None
        if gpus:
            queue = ctx.Queue()
            for i in range(jobs):
                queue.put(i % gpus)
        self.pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=init_worker,
                                           initargs=(os.getpid(), queue))

    def submit(self, fn, *args):
        try:
            return self.pool.submit(fn, *args)
        except cf.process.BrokenProcessPool as exc:  # a worker died since the last result
            raise WorkerDied(str(exc)) from None

    def wait(self, handles):
        return cf.wait(list(handles), return_when=cf.FIRST_COMPLETED).done

    def result(self, handle):
        try:
            return handle.result()
        except cf.process.BrokenProcessPool as exc:
            raise WorkerDied(str(exc)) from None

    def share(self, path: Path):
        return str(path)

    def close(self) -> None:
        """Cancel what has not started and stop the workers (a task still running is lost; its
        run is done again on resume)."""
        procs = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()


class SerialExecutor:
    """Runs each task in this process when it is submitted."""

    jobs = 1
    threads = None

    def submit(self, fn, *args):
        fut = cf.Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:  # delivered by result(), like a pool would
            fut.set_exception(exc)
        return fut

    def wait(self, handles):
        return set(handles)

    def result(self, handle):
        return handle.result()

    def share(self, path: Path):
        return str(path)

    def close(self) -> None:
        pass


class RayExecutor:
    """Tasks as Ray remote functions (one CPU each, plus one GPU for a task that runs a model when
    the cluster has GPUs) on a local or remote cluster. Traces travel through Ray's object store,
    so remote nodes need no shared filesystem; they need dipstream and its model packages."""

    def __init__(self, jobs: int | None, address: str | None):
        try:
            import ray
        except ImportError:
            raise DipstreamError("--executor ray needs Ray, which is not installed: pip install "
                                 "'ray>=2.9' (or pip install 'dipstream[ray]')") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kw = {"num_cpus": jobs} if address is None and jobs else {}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DipstreamError(f"cannot start or reach the Ray cluster "
                                     f"{address or '(local)'}: {str(exc).splitlines()[0]}") from None
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.jobs = jobs or max(1, self.gpus or int(resources.get("CPU", 1)))
        self.threads = 1
        self._remote = {}

    def submit(self, fn, *args):
        if fn not in self._remote:
            gpu = 1 if self.gpus and getattr(fn, "runs_model", False) else 0
            self._remote[fn] = self.ray.remote(num_cpus=1, num_gpus=gpu, max_retries=0)(fn)
        return self._remote[fn].remote(*args)

    def wait(self, handles):
        done, _ = self.ray.wait(list(handles), num_returns=1)
        return set(done)

    def result(self, handle):
        from ray import exceptions as rx

        try:
            return self.ray.get(handle)
        except (rx.WorkerCrashedError, rx.NodeDiedError, rx.OutOfMemoryError) as exc:
            raise WorkerDied(str(exc).splitlines()[0]) from None
        except rx.RayTaskError as exc:  # re-raise the task's own error (e.g. DipstreamError)
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BaseException) else exc) from None

    def share(self, path: Path):
        return self.ray.put(Path(path).read_bytes())

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, jobs: int | None, address: str | None = None, gpus: int | None = None):
    """The executor `kind`; local: `jobs` workers (default one per GPU, else one per CPU), each
    pinned to one of `gpus` GPUs (default: all visible; 0 keeps the workers off the GPUs)."""
    if jobs is not None and jobs < 1:
        raise DipstreamError(f"--jobs {jobs} must be at least 1 (or leave it out for one per CPU)")
    if gpus is not None and gpus < 0:
        raise DipstreamError(f"--gpus {gpus} must be 0 or more (or leave it out to use every visible GPU)")
    if kind == "local":
        visible = gpu_count()
        if gpus is not None and gpus > visible:
            raise DipstreamError(f"--gpus {gpus}: only {visible} CUDA device(s) are visible here; "
                                 f"use --gpus {visible} or leave it out")
        gpus = visible if gpus is None else gpus
        return LocalExecutor(jobs or gpus or os.cpu_count() or 1, gpus)
    if kind == "serial":
        return SerialExecutor()
    if kind == "ray":
        return RayExecutor(jobs, address)
    raise DipstreamError(f"unknown executor '{kind}'; use one of {', '.join(EXECUTORS)}")
