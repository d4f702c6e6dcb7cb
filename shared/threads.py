"""One thread budget for every thread pool a run touches.

A stage-2 run uses torch (intra-op OpenMP/MKL and inter-op pools), OpenBLAS (numpy, scipy,
scikit-learn), OpenMP runtimes loaded by other libraries (DGL's libgomp), numba (pynndescent) and
DGL's own setting. Left alone each sizes itself to the machine, so a run asked for one thread used
~1.7 cores and runs side by side oversubscribed the CPU. :func:`apply_thread_budget` sets all of
them to one number: the ``threads`` asked for, else ``OMP_NUM_THREADS``, else every core this
process may run on.
"""
from __future__ import annotations

import os
import warnings

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
_limits = None  # the threadpoolctl controller, kept alive for the process


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(threads: int | None = None) -> int:
    """``threads`` if given, else ``OMP_NUM_THREADS`` if set, else the usable cores."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(env) if env.isdigit() and int(env) > 0 else usable_cores()
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


def apply_thread_budget(threads: int | None = None) -> int:
    """Bound every thread pool of this process to ``threads`` (see :func:`resolve_threads`); returns it.

    Environment variables cover libraries loaded later; pools already loaded are set directly.
    torch's inter-op pool can only be sized before its first use: if that has happened with another
    size, a warning says so (the intra-op pool, where the work is, is still set).
    """
    global _limits
    n = resolve_threads(threads)
    for var in _ENV:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:
            warnings.warn(f"torch's inter-op pool was already started with {torch.get_num_interop_threads()} "
                          f"threads; it stays so in this process (start a new one to change it)", stacklevel=2)
    import threadpoolctl

    if _limits is not None:
        _limits.restore_original_limits()
    _limits = threadpoolctl.threadpool_limits(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    import sys

    if "dgl" in sys.modules:  # DGL is imported by stage 2 only (semst.cluster.dgl_compat)
        sys.modules["dgl"].utils.set_num_threads(n)
    return n


def pool_sizes() -> dict[str, int]:
    """Threads of every pool this process has loaded, by name (for tests and reports)."""
    import sys

    import threadpoolctl
    import torch

    sizes = {"torch intra-op": torch.get_num_threads(), "torch inter-op": torch.get_num_interop_threads()}
    for info in threadpoolctl.threadpool_info():
        sizes[f"{info['user_api']} {info['internal_api']} {os.path.basename(info['filepath'])}"] = info["num_threads"]
    if "numba" in sys.modules:
        sizes["numba"] = sys.modules["numba"].get_num_threads()
    if "dgl" in sys.modules:
        sizes["dgl"] = sys.modules["dgl"].utils.get_num_threads()
    return sizes
