"""Adversarial attacks: FGSM, PGD, APGD, transfer, the reference AutoAttack and Square; it may import
:mod:`flatnb.runtime`, :mod:`flatnb.data` and :mod:`flatnb.models`, never the measurements built on it.

Attacks are plain functions over tensors (cleverhans v4 style).  Every model
follows the flatnb contract: ``model.features(x) -> phi`` (N, m), ``model.head``
is the final ``nn.Linear`` and ``model(x) == model.head(model.features(x))``.
Inputs are pixels in [0, 1].

Conventions shared by all attacks
---------------------------------
* **Eval mode.**  The model is switched to ``eval()`` for the attack and put
  back into its previous mode afterwards (frozen BatchNorm, no dropout).
  Parameters are not touched.
* **Iterates.**  ``x_0`` is the starting point (the clean input, or a random
  point in the ball with ``random_start=True``) and ``x_1 .. x_T`` follow the
  ``T`` gradient steps.  Each iterate gets exactly one forward pass,
  ``phi = model.features(x)``, ``logits = model.head(phi)``; the loss, the
  gradient and everything recorded come from that pass.  ``x_T`` is evaluated
  without a gradient.
* **Best iterate.**  Per example the attack keeps the best point seen, the
  clean input included: a successful iterate beats an unsuccessful one, and
  among equals the higher attack loss wins.  So ``x_adv`` is the highest-loss
  *successful* iterate when there is one, and ``success`` is consistent with it.
  Success is a label flip (``pred != y``), or ``pred == target`` when targeted.
* **No host synchronisation per step.**  Everything stays on the device;
  ``early_stop`` checks ``success.all()`` every ``check_every`` steps (one
  sync each time), and the zero-gradient report syncs once at the end.
* **Mixed precision.**  ``autocast_dtype=torch.bfloat16`` runs ``features``
  under autocast; the head, the loss and every recorded quantity are computed
  in float32 from ``phi.float()`` (curvature is never taken in bf16).
* **Bad input.**  Empty batches, NaN/inf inputs or parameters (checked with the box, one host
  sync at the start) and logits that become NaN/inf (one sync at the end) raise ``ValueError``
  naming the rows or the parameter: never a robust accuracy computed from NaN.
* **Hooks.**  ``on_iterate(t, x_t, phi, logits, loss)`` sees every iterate's own forward pass;
  ``record=Recorder`` attaches a recorder built from the class the caller passes
  (:class:`flatnb.measure.trajectory.Recorder`, which fills ``result.trajectory``): the attacks import
  nothing from the measurements built on them.
* **Losses.**  A named loss (``"ce"``, ``"cw"``, ``"dlr"``), or for :func:`pgd` a callable
  ``loss(phi, logits, y, target) -> (N,)`` evaluated on each iterate's own forward pass; it also ranks the
  successful iterates for ``x_adv`` (a loss built on curvature lives in the measurements, e.g.
  :func:`flatnb.measure.detector.kappa_matching_loss`, and is passed in: the attacks import nothing from it).
* **Zero gradients.**  Examples whose input gradient is exactly zero at the
  first step (a saturated softmax: float32 CE gradients underflow for a scaled
  head, experiment E3 of Walter et al. 2026) are reported in ``AttackResult.zero_grad`` with a warning, as
  AutoAttack's checks do.  Use ``loss="cw"`` or ``"dlr"`` then.
* **Speed.**  An attack costs one forward+backward pass per step plus one
  forward pass for the last iterate.  For BatchNorm networks, attacking
  ``flatnb.models.fold_batchnorm(model)`` (the same function with Conv→BN
  folded) is 1.1–1.4× faster; on a GPU add ``autocast_dtype=torch.bfloat16``
  and channels_last (``benchmarks/attacks.py``).

Layout: :mod:`~flatnb.attacks.losses` (CE, CW, DLR, the true margin), :mod:`~flatnb.attacks.core`
(results, validation, projection, the best-iterate tracker, :func:`cat_results`),
:mod:`~flatnb.attacks.pgd` (PGD, FGSM), :mod:`~flatnb.attacks.apgd`, :mod:`~flatnb.attacks.transfer`,
:mod:`~flatnb.attacks.dataset` (:func:`attack_dataset`: any attack over a dataset, batch by batch),
:mod:`~flatnb.attacks.reference` (the reference AutoAttack and Square, from ``pyautoattack``).
"""
from flatnb.attacks.apgd import apgd, apgd_checkpoints
from flatnb.attacks.core import APGD_LOSSES, LOSSES, NORMS, AttackResult, TransferResult, cat_results
from flatnb.attacks.dataset import attack_dataset
from flatnb.attacks.losses import ce_loss, cw_loss, dlr_loss, true_margin
from flatnb.attacks.pgd import fgsm, pgd
from flatnb.attacks.reference import autoattack, square
from flatnb.attacks.transfer import transfer

__all__ = ["APGD_LOSSES", "LOSSES", "NORMS", "AttackResult", "TransferResult", "apgd", "apgd_checkpoints",
           "attack_dataset", "autoattack", "square", "cat_results", "ce_loss", "cw_loss", "dlr_loss", "fgsm", "pgd",
           "transfer", "true_margin"]
