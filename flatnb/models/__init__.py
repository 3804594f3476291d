"""The networks and what the book does to any of them: the features/head contract (:mod:`.contract`), the
architectures (:mod:`.architectures`) and published weights (:mod:`.weights`); it may import
:mod:`flatnb.runtime`, :mod:`flatnb.config` and :mod:`flatnb.data`.

``from flatnb import models; models.wrap(net)``: the contract's functions are re-exported here.
"""
from flatnb.models.architectures import describe
from flatnb.models.contract import (MODELS, HeadModel, build, check_contract, fold_batchnorm, num_features,
                                    scale_head, wrap)

__all__ = ["MODELS", "HeadModel", "build", "check_contract", "describe", "fold_batchnorm", "num_features", "scale_head", "wrap"]
