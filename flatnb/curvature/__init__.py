"""Curvature and the paper's theory: last-layer closed forms, exact references, parameter-space operators,
input space and the local bound (:mod:`.bounds`); it may import :mod:`flatnb.runtime` and :mod:`flatnb.models`.

* :mod:`~flatnb.curvature.last_layer` — κ in all three conventions from one forward pass
  (:func:`closed_form`, :func:`flatness_over`).
* :mod:`~flatnb.curvature.reference` — dense Hessians and autograd references (tests, chapter 1).
* :mod:`~flatnb.curvature.hessian` — :class:`ParameterHVP` (an operator) and the algorithms that
  take an operator: :func:`hutchinson_trace`, :func:`lanczos`, :func:`power_iteration_deflated`.
* :mod:`~flatnb.curvature.input_space` — input gradients, HVPs, directional curvature and the
  directions of chapter 11.
* :mod:`~flatnb.curvature.bounds` — the lemma, Lipschitz constants, the local bound and its radii
  (``from flatnb.curvature import bounds``; not re-exported here).
"""
from flatnb.curvature._common import NonFiniteError, require_eval
from flatnb.curvature.hessian import (ParameterHVP, TraceEstimate, hessian_eigenvalues, hutchinson_trace,
                                      lanczos, power_iteration_deflated)
from flatnb.curvature.input_space import (AUGMENTATIONS, InputEigen, augmentation_directions,
                                          directional_curvature, input_gradient, input_gradient_norm, input_hvp,
                                          input_top_eigenvalue, loss_along, neighbour_directions, unit_directions)
from flatnb.curvature.last_layer import (FlatnessOver, FlatnessTerms, class_distances, closed_form, flatness_over,
                                         gini, kappa_layerwise, kappa_neuronwise, model_flatness, softmax_hessian,
                                         trace_hessian, weight_norm)
from flatnb.curvature.reference import (kappa_from_hessian, last_layer_hessian, last_layer_hessian_autograd,
                                        last_layer_hessian_batch, last_layer_hessian_batch_autograd)

__all__ = [n for n in dir() if not n.startswith("_")]
