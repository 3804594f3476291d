"""The scaffold every chapter stands on: one call at the top, a few methods after.

    ch = chapter.setup("05_uncanny_valley", profile, device, seed)
    model = ch.model()                       # the chapter's main model, trained once and cached
    ch.paper_table([...]); ch.verdicts([...]); ch.provenance()

:func:`setup` resolves the profile and the device, seeds torch, picks the CPU thread count, sets the
figure style, reads the chapter's sample sizes for its profile (``ch.sizes``, from
:data:`flatnb.config.budgets.SIZES`) and shows the banner: which profile, device, date and commit the page
shows, which data, which model and its clean accuracy, and where the full-profile run is. Nothing
here is global: a :class:`Chapter` holds it all, and helpers take it as an argument.
"""
from __future__ import annotations

import datetime as _dt
import html
import os
import time
from types import SimpleNamespace

import torch

from flatnb import data as fdata
from flatnb.config import budgets
from flatnb.evidence import claims as fclaims
from flatnb.evidence import run_records as records
from flatnb.runtime import describe_device, resolve_device, resolve_profile, versions

#: the banner line that names the chapter's full-profile record; the site build rewrites what follows it
#: (:func:`flatnb.book.site.restamp_banner`), so both read it from here
FULL_RUN_PREFIX = "Full-profile run (shipped evidence models, referee sample sizes): "

# Threads on the CPU: see the README ("Threads") for the measurement behind the default.
DEFAULT_CPU_THREADS = 1


def _style() -> None:
    """Figures legible at the book's page width: larger fonts, high-dpi PNGs, no minor-tick clutter."""
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 150, "font.size": 11, "axes.titlesize": 11,
        "axes.labelsize": 11, "legend.fontsize": 9, "xtick.labelsize": 10, "ytick.labelsize": 10,
        "xtick.minor.visible": False, "ytick.minor.visible": False, "axes.grid": True,
        "grid.alpha": 0.3, "figure.constrained_layout.use": True,
    })
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("retina")
    except Exception:  # noqa: BLE001 - outside IPython there is no inline backend to configure
        pass


def _wrap(text: str, width: int = 88) -> str:
    """Wrap a long provenance line at ``width`` columns, continuation lines indented."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, subsequent_indent=" " * 11))


def _display(obj, display_id=None, update=False):
    try:
        from IPython.display import display
    except ImportError:  # plain Python: print the text form
        print(getattr(obj, "data", obj))
        return None
    if update:
        return display(obj, display_id=display_id, update=True)
    return display(obj, display_id=display_id)


class Chapter:
    """A chapter's run: profile, device, seed, sizes, timer, banner, tables and verdict rows."""

    def __init__(self, stem: str, profile: str, device: torch.device, seed: int, sizes: dict):
        self.stem, self.profile, self.device, self.seed = stem, profile, device, seed
        self.sizes = SimpleNamespace(**sizes)
        self.start = time.time()
        self.date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        self.models: list[str] = []
        self.data: str | None = None
        self._banner_id = f"flatnb-banner-{stem}-{id(self)}"

    # ------------------------------------------------------------------ banner
    def _full_run(self) -> str:
        try:
            recs = [r for r in records.load_all() if r["meta"]["chapter"] == self.stem
                    and r["meta"]["profile"] == "full"]
        except ValueError as e:  # a corrupt record: say so in the banner, do not hide the page
            return f"a run record could not be read ({e})"
        if not recs:
            return ("pending: no full-profile run record of this chapter yet (the shipped evidence models at "
                    "referee sample sizes, on any device: <code>python -m flatnb.book --profile full --jobs 2</code>)")
        r = max(recs, key=lambda r: r["meta"]["date"])
        return f"{html.escape(records.label(r))}: <code>{html.escape(os.path.relpath(r['path']))}</code>"

    def banner_html(self) -> str:
        commit = (records.commit() or "unknown")[:7]
        lines = [f"<b>This page shows a {self.profile}-profile run</b> on {html.escape(describe_device(self.device))}, "
                 f"{self.date}, commit {commit}."]
        if self.profile == "quick":
            lines.append("Quick profile: small models and samples that run in minutes on a CPU; read the "
                         "shapes, not the magnitudes.")
        elif self.profile == "smoke":
            lines.append("<b>Smoke profile: the full profile's code at toy scale (one epoch of a few hundred "
                         "images, a handful of test images). Its numbers mean nothing; it exists to test a "
                         "full-profile run before its hours are spent.</b>")
        if self.data:
            lines.append(f"Data: {html.escape(self.data)}.")
        if self.models:
            lines.append("Model: " + "; ".join(html.escape(m) for m in self.models) + ".")
        lines.append(FULL_RUN_PREFIX + self._full_run() + ".")
        return ('<div class="flatnb-banner" style="border-left:4px solid #4a7ab5;padding:0.4em 0.8em;'
                'margin:0.5em 0;background:rgba(74,122,181,0.08)">' + "<br>".join(lines) + "</div>")

    def show_banner(self, update: bool = False) -> None:
        try:
            from IPython.display import HTML
        except ImportError:
            print(self.banner_html())
            return
        _display(HTML(self.banner_html()), display_id=self._banner_id, update=update)

    # ------------------------------------------------------------------ models and data
    def model(self, arch: str = "main", dataset: str = "cifar10", recipe: str = "standard",
              seed: int | None = None, describe: str | None = None):
        """The model of the recipe table in eval mode on the chapter's device: the shipped weights under
        ``weights/`` where the manifest holds exactly this recipe and data (:func:`flatnb.zoo.model`), else
        trained once and cached; its clean test accuracy (and where it comes from) goes into the banner."""
        # loaded here, not at the top: a chapter that uses no model (1-4, 12) then does not fingerprint the
        # training code or the zoo in its run record (flatnb.evidence.run_records), so a change there leaves it current
        from flatnb import zoo
        from flatnb.training import train as ftrain

        seed = self.seed if seed is None else seed
        model = zoo.model(arch, dataset, recipe=recipe, profile=self.profile, seed=seed, device=self.device)
        test = ftrain.test_data(ftrain.config_for(arch, dataset, recipe, self.profile, seed))
        return self._introduce(model, test, describe or f"{getattr(model, 'train_info', {}).get('config', {}).get('arch', arch)} "
                               f"({recipe}, {dataset})", dataset)

    def shipped(self, name: str, describe: str | None = None):
        """A shipped model of ``weights/manifest.json`` by name (e.g. ``"resnet18-pyautoattack"``, the paper's
        architecture as the reference AutoAttack ships it), SHA-256 checked, in eval mode on the chapter's device."""
        from flatnb import zoo  # see model()

        model = zoo.load(name, self.device)
        return self._introduce(model, fdata.load("cifar10", "test"), describe or name, "cifar10")

    def zoo_model(self, spec, describe: str | None = None):
        """A model named as budgets' tables name them: a shipped model's name (``"resnet18-pyautoattack"``) or an
        ``(arch, dataset, recipe, seed)`` of the recipe table."""
        if isinstance(spec, str):
            return self.shipped(spec, describe=describe)
        return self.model(spec[0], spec[1], spec[2], seed=spec[3], describe=describe)

    def at_pair(self) -> dict:
        """``{"standard": model, "AT": model}``: the adversarially trained model and its standard twin of
        :data:`flatnb.config.budgets.AT_PAIR` (one architecture and schedule, only the attack differs;
        chapters 9 and 11)."""
        return {role: self.zoo_model(spec, describe=f"{role}: {spec[0]} ({spec[2]}, {spec[1]})")
                for role, spec in budgets.AT_PAIR[self.profile].items()}

    def main_models(self) -> dict:
        """The models a claim about "a trained model" is checked on in this profile (label → model):
        :data:`flatnb.config.budgets.MAIN_MODELS` (quick: the main model; full: three seeds of the main model
        and the paper's ResNet-18)."""
        out = {}
        for label, spec in budgets.MAIN_MODELS[self.profile].items():
            out[label] = self.zoo_model(spec, describe=label)
        return out

    def _introduce(self, model, test, name: str, dataset: str):
        """Clean accuracy into the banner: the manifest's (all test images, measured when the model was
        shipped; ``python -m flatnb.zoo verify`` re-measures it) when ``test`` is the whole test set, else
        measured here."""
        from flatnb.training import train as ftrain

        if self.profile == "smoke":  # a full-width model on all test images takes minutes on a CPU
            from flatnb.config import smoke  # only a smoke run loads it (see flatnb.config)

            test = fdata.subset(test, n=min(len(test.labels), smoke.EVAL_IMAGES), seed=0)
        entry = getattr(model, "shipped", None) or {}
        clean = entry.get("clean", {})
        if clean.get("n") == len(test.labels) and clean.get("images") == "all test images":
            where = (f"{entry['external']['package']}'s {entry['external']['file']}, SHA-256 pinned" if "external" in entry
                     else f"shipped weights {entry.get('file')}")
            acc, origin = clean["value"], f"{where}; accuracy from the manifest"
        else:
            acc = ftrain.evaluate(model, test, self.device)["accuracy"]
            origin = f"shipped weights {entry['file']}" if "file" in entry else (
                f"shipped model {entry['name']}" if entry else "trained here")
        self.models.append(f"{name}: clean accuracy {100 * acc:.1f} % on {len(test.labels):,} test images ({origin})")
        describe_source = getattr(fdata, "source_description", None)
        if describe_source is not None and self.data is None:
            try:
                self.data = describe_source(dataset)
            except Exception:  # noqa: BLE001 - the banner must not fail a chapter
                self.data = None
        self.show_banner(update=True)
        model.clean_accuracy = acc
        return model

    # ------------------------------------------------------------------ tables and verdicts
    def paper_table(self, rows) -> None:
        """The "paper versus this book" table: rows of (experiment, quantity, paper's number, ours)."""
        from IPython.display import Markdown

        _display(Markdown(fclaims.paper_markdown(rows)))

    def verdicts(self, rows: list[dict], **extra_meta) -> None:
        """Save the chapter's verdict rows as this run's record (``self.record``) and show them."""
        from IPython.display import Markdown

        meta = records.meta(self.stem, self.profile, self.device, self.seed, time.time() - self.start,
                            data=self.data, models=self.models, **extra_meta)
        if self.profile == "smoke" and not os.environ.get("FLATNB_RUN_DIR"):
            self.record = None  # a smoke run's rows mean nothing: no record under runs/ (the dry run keeps one aside)
        else:
            self.record = records.save(rows, meta)
        _display(Markdown(fclaims.claims_markdown(rows)))

    def provenance(self) -> None:
        """Print how this page's numbers were produced."""
        print(f"chapter:   {self.stem}\nprofile:   {self.profile}\ndevice:    {describe_device(self.device)}\n"
              f"commit:    {records.commit() or 'unknown'}{' (uncommitted changes)' if records.dirty() else ''}\n"
              f"date:      {self.date}\nseed:      {self.seed}\nwall time: {time.time() - self.start:.1f} s\n"
              + _wrap("versions:  " + ", ".join(f"{k} {v}" for k, v in versions().items())))


def setup(stem: str, profile: str = "auto", device: str = "auto", seed: int = 0,
          threads: int | None = None, banner: bool = True) -> Chapter:
    """Resolve ``profile``/``device``, seed torch, set threads and figure style, show the banner."""
    dev = resolve_device(device)
    prof = resolve_profile(profile, dev)
    if dev.type == "cpu":
        n = threads or int(os.environ.get("FLATNB_THREADS", DEFAULT_CPU_THREADS))
        torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    torch.manual_seed(seed)
    _style()
    sizes = budgets.sizes(stem, prof)
    ch = Chapter(stem, prof, dev, seed, sizes)
    if banner:
        ch.show_banner()
    return ch
