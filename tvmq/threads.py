"""How many threads TVM's runtime thread pool runs kernels on.

TVM sizes its pool once, at the first parallel kernel, from ``TVM_NUM_THREADS`` or else half
the logical CPUs on x86 (it assumes two hyper-threads per core). On a machine without SMT
that halves every parallel kernel: a 2-vCPU VM ran on one thread. tvmq sets the variable to
the physical cores this process may run on, unless the user already set it.
"""

from __future__ import annotations

import os

import psutil

VARIABLE = "TVM_NUM_THREADS"


def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings count once)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = psutil.cpu_count(logical=True) or allowed or 1
    physical = psutil.cpu_count(logical=False) or logical
    if allowed is None:
        return physical
    # Affinity lists logical CPUs; scale by the machine's SMT ratio.
    return max(1, allowed * physical // logical)


def use_every_core() -> int:
    """Set ``TVM_NUM_THREADS`` to the physical core count unless it is set; return the count.

    Must run before TVM launches its first parallel kernel in this process (importing
    tvmq does it); child processes (tuning runners, RPC servers) inherit it.
    """
    if not os.environ.get(VARIABLE, "").strip().isdigit():
        os.environ[VARIABLE] = str(physical_cores())
    return int(os.environ[VARIABLE])
