"""flatnb: flatness and adversarial robustness, after Walter et al. (ICLR 2026).

One subpackage per job, plain functions over tensors, device and dtype explicit. Imports go down this
list only (each subpackage's ``__init__`` says what it owns and what it may import):

* ``runtime`` (profile, device, cache folder, atomic writes, versions) and ``stats`` (intervals, rank
  correlations): leaves that everything may import;
* ``config`` (every number: ``TrainConfig``, the recipe table, attack budgets, chapter sizes, the smoke
  profile);
* ``data`` (downloads, archives, cached datasets, batches);
* ``models`` (the features/head contract, the architectures, published weights);
* ``training`` (the loop and checkpoint cache, optimisers), ``curvature`` (last-layer closed forms, exact
  references, the parameter Hessian operator, input space, the local bound) and ``attacks`` (FGSM, PGD,
  APGD, transfer, the reference AutoAttack and Square; an ``on_iterate`` hook), side by side;
* ``measure`` (attack trajectories and their boundary crossings, radii, walls, calibration, the detector,
  the atlas, the theory chapters' toy problems);
* ``zoo`` (the shipped weights of every model the book uses, their manifest, and ``python -m flatnb.zoo``
  to train, measure, ship and verify them);
* ``evidence`` (claim rows and the verdict policy, run records, chapter 12's verdict table);
* ``book`` (the chapter scaffold, the figures, the papermill runner and HTML build:
  ``python -m flatnb.book``).
"""
__version__ = "0.2.0"
