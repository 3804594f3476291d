"""The datasets, from the files on disk to device-side batches; it may import :mod:`flatnb.runtime` and
:mod:`flatnb.config`.

:mod:`.download` finds a dataset's files (and fetches missing ones), :mod:`.archives` reads and decodes
them, :mod:`.datasets` caches the decoded splits and serves subsets and batches. The names below are the
public API (``from flatnb import data; data.load("cifar10", "test")``); patch a module's own globals in
its module (``flatnb.data.datasets.CIFAR10_SHA256``), not here.
"""
from flatnb.config.train_config import DATASETS, NUM_CLASSES
from flatnb.data.datasets import (CIFAR10_CLASSES, CIFAR10_SHA256, MEAN_STD, SPLITS, Dataset, Loader, array_sha256,
                                  augment_batch, batches, check_cifar10, download_default, load,
                                  source_description, split, subset)
from flatnb.data.download import DownloadError, data_root, find_source

__all__ = ["CIFAR10_CLASSES", "CIFAR10_SHA256", "DATASETS", "MEAN_STD", "NUM_CLASSES", "SPLITS", "Dataset",
           "DownloadError", "Loader", "array_sha256", "augment_batch", "batches", "check_cifar10", "data_root",
           "download_default", "find_source", "load", "source_description", "split", "subset"]
