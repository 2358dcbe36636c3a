"""How many (particle, datapoint) rows one evaluation pass computes, by device.

Evaluation (IW log-likelihood, ELBO terms, imputation) runs the model on ``batch x chunk``
rows at a time: datapoints times particles. On a CPU the best passes fit in the caches (a few
thousand rows of a 784-pixel model: larger ones are slower, measured by
``benchmarks/bench_iwll.py --sweep``); on a GPU they are as large as memory allows, since each
pass costs a fixed launch overhead.
"""

from __future__ import annotations

import torch

__all__ = ["default_sizes", "pass_rows"]

#: Rows per pass on a CPU for data of 784 dimensions (scaled inversely with the width).
CPU_ROWS_AT_784 = 5_000
#: Rows per pass on a GPU, at most (then bounded by free memory).
GPU_ROWS = 500_000
#: Datapoints per pass, at most, on each kind of device.
BATCH = {"cpu": 250, "cuda": 500}


def pass_rows(device: torch.device, x_dim: int, itemsize: int = 4) -> int:
    """Rows (datapoints x particles) for one pass on ``device`` with data of width ``x_dim``.

    On CUDA: :data:`GPU_ROWS`, bounded so that about 8 row-sized tensors take at most a quarter
    of the free memory. Elsewhere: :data:`CPU_ROWS_AT_784` scaled to ``x_dim``.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, min(GPU_ROWS, free // 4 // (8 * x_dim * itemsize)))
    return max(1, CPU_ROWS_AT_784 * 784 // max(x_dim, 1))


def default_sizes(num_data: int, num_samples: int, device: torch.device, x_dim: int,
                  itemsize: int = 4, batch_size: int | None = None,
                  chunk_size: int | None = None) -> tuple[int, int]:
    """``(batch_size, chunk_size)``: datapoints and particles per pass, each as given or
    chosen so that their product is about :func:`pass_rows`."""
    rows = pass_rows(device, x_dim, itemsize)
    if batch_size is None:
        batch_size = max(1, min(num_data, BATCH.get(device.type, BATCH["cpu"]), rows))
    if chunk_size is None:
        chunk_size = max(1, rows // batch_size)
    return batch_size, min(num_samples, chunk_size)
