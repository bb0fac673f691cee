"""Study preparation in worker processes: one function mapped over picklable loaders, in order."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def default_workers() -> int:
    """Preparation processes: one per CPU core and 3 GB of memory, at most 8."""
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(len(os.sched_getaffinity(0)), int(memory_gb // 3), 8))


def _single_threaded() -> None:
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _picklable(item: object) -> bool:
    try:
        pickle.dumps(item)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def in_workers(function: Callable[[Item], Result], items: Sequence[Item], workers: int | None = None) -> Iterator[Result]:
    """``function(item)`` for each item, in order: in ``workers`` spawned single-threaded processes
    (default ``default_workers()``) where there is more than one item and the items can be sent to
    another process (the virtual cohort's loaders can; lambdas, as for a folder's studies, cannot),
    else here. Results are identical either way; the workers start at the first ``next``."""
    workers = min(workers or default_workers(), len(items))
    if workers < 2 or not _picklable(items[0]):
        yield from map(function, items)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_single_threaded) as pool:
        yield from pool.map(function, items)
