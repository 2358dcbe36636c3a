"""Data: real images (Fashion-MNIST, MNIST, scikit-learn digits), synthetic PPCA data, your
own data (an array file or a folder of images), binarization, structured-prediction splits
and mini-batches.

Every dataset follows the data contract of ``DESIGN.md``: ``x`` is a float32 tensor of shape
``(N, D)`` with images flattened and ``image_shape`` kept for plotting, labels are int64 of
shape ``(N,)``.

>>> from pvae import data
>>> ds = data.load("digits")
>>> ds.x_train.shape, ds.image_shape, ds.num_classes
(torch.Size([1438, 64]), (8, 8), 10)
"""

from pvae.data.batches import batches
from pvae.data.binarize import bernoulli_sample, binarize, check_intensities
from pvae.data.conditions import (
    CONDITIONS,
    ConditionSplit,
    condition_mask,
    split_condition,
    training_pairs,
)
from pvae.data.datasets import DATASETS, dataset_options, load
from pvae.data.idx import DataNotFoundError, IDXError, read_idx, search_paths
from pvae.data.own import DataFileError, load_data_file, load_image_folder
from pvae.data.splits import Splits

#: The former name of :class:`Splits` (it is not a ``torch.utils.data.Dataset``).
Dataset = Splits

__all__ = [
    "CONDITIONS",
    "DATASETS",
    "ConditionSplit",
    "DataFileError",
    "DataNotFoundError",
    "Dataset",
    "IDXError",
    "Splits",
    "batches",
    "bernoulli_sample",
    "binarize",
    "check_intensities",
    "condition_mask",
    "dataset_options",
    "load",
    "load_data_file",
    "load_image_folder",
    "read_idx",
    "search_paths",
    "split_condition",
    "training_pairs",
]
