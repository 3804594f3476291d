"""flatnb: flatness and adversarial robustness, after Walter et al. (ICLR 2026).

One module per concept, plain functions over tensors, device and dtype explicit:

* ``models`` (the features/head contract, ``wrap``, ``scale_head``, ``fold_batchnorm``) and
  ``architectures`` (the networks);
* ``curvature`` (last-layer closed forms, exact references, the parameter Hessian operator and its
  algorithms, input space) and ``bounds`` (the lemma, Lipschitz constants, the local bound and radii);
* ``attacks`` (FGSM, PGD, APGD, transfer, the reference AutoAttack and Square; a recording hook),
  ``trajectory`` (recorded attack paths and their statistics), ``figures``, ``detector``;
* ``data``, ``download``, ``recipes`` (every training configuration), ``train``, ``weights``;
* ``budgets`` (named attacks, chapter sizes), ``stats`` (intervals), ``claims`` (the verdict policy),
  ``records`` (run records), ``verdict`` (chapter 12), ``chapter`` (the chapter scaffold),
  ``runtime`` (profile, device, cache), ``smoke`` (the full profile at toy scale, for the dry run) and
  ``book`` (the papermill runner).
"""
__version__ = "0.2.0"
