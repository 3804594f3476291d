"""Every page of the built HTML book in a real browser (headless Chromium driven by Playwright): issue 16.

A session fixture builds the HTML from the committed outputs with the runner
(``python -m flatnb.book --no-execute --path-output <tmp>``); then each page is checked for raw Markdown
table syntax, images that did not load, figures or tables wider than the content column, raw TeX that
MathJax did not typeset (MathJax is served from the site's ``_static/``, never from a CDN: the test runs
offline), and the chapter banner. Full-page screenshots of chapters 5 and 12 are kept under
``_build/screenshots/`` (CI artifacts).

Chromium: ``FLATNB_CHROMIUM``, else ``chromium`` on the PATH (Debian's package). Without it or without the
``playwright`` package the tests are skipped, except when ``CI=true``, where they fail.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flatnb.book import runner as book

ROOT = book.ROOT
SCREENSHOTS = ROOT / "_build" / "screenshots"
SCREENSHOT_PAGES = ("05_uncanny_valley", "12_verdict", "13_atlas")
CHAPTERS = [c.relative_to(ROOT).with_suffix(".html").as_posix() for c in book.chapters()]
PAGES = ["intro.html", *CHAPTERS]
VIEWPORTS = {"desktop": (1280, 1000), "phone": (390, 844)}
# a Markdown table's separator row: |---| or | --- |, or |—| once typography turned --- into an em dash
RAW_TABLE = r"/\|\s*:?(-{3,}|[\u2013\u2014]+):?\s*\|/"
# TeX delimiters a reader must never see: MyST writes $...$ and $$...$$ as \(...\) and \[...\] for MathJax
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "$$")
# pages that hold math: each must show typeset math (a page whose math was not parsed as math at all
# shows no delimiters, only dollars)
MATH_PAGES = ("book/01_relative_flatness.html", "book/03_local_bound.html")


def _missing(why: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: the browser test must run in CI)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The HTML book built by the runner into a temp folder; returns the html/ folder."""
    out = tmp_path_factory.mktemp("book-build")
    result = subprocess.run([sys.executable, "-m", "flatnb.book", "--no-execute", "--path-output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"the HTML build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    html = out / "_build" / "html"
    assert (html / "intro.html").is_file()
    return html


@pytest.fixture(scope="session")
def browser():
    chromium = os.environ.get("FLATNB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        _missing("no chromium binary (apt-get install chromium, or set FLATNB_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, site: Path, page_name: str, viewport: str):
    width, height = VIEWPORTS[viewport]
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto((site / page_name).as_uri(), wait_until="load")
    # load lazily loaded images too, then wait for every local image to finish (loaded or failed)
    page.evaluate("() => { document.querySelectorAll('img').forEach(i => i.loading = 'eager');"
                  " window.scrollTo(0, document.body.scrollHeight); }")
    page.wait_for_function("() => [...document.querySelectorAll('img')]"
                           ".every(i => !i.src.startsWith('file:') || i.complete)", timeout=30_000)
    # MathJax typesets after the load event: wait for its first typeset (when MathJax loaded at all), so
    # that every check and screenshot sees the page as a reader does
    page.evaluate("""() => window.MathJax && MathJax.startup && MathJax.startup.promise
        ? Promise.race([MathJax.startup.promise.then(() => true, () => false),
                        new Promise(r => setTimeout(() => r(false), 30000))])
        : null""")
    return page


@pytest.mark.parametrize("page_name", PAGES)
def test_page_in_a_browser(browser, site, page_name):
    page = _open(browser, site, page_name, "desktop")
    try:
        raw = page.evaluate(f"""() => {{
            const article = document.querySelector('article') || document.body;
            const copy = article.cloneNode(true);
            copy.querySelectorAll('.cell_input, script, style').forEach(e => e.remove());  // code is code
            return copy.textContent.split('\\n').filter(l => {RAW_TABLE}.test(l)).slice(0, 5);
        }}""")
        assert not raw, f"{page_name}: raw Markdown table syntax in the page: {raw}"

        broken = page.evaluate("""() => [...document.querySelectorAll('img')]
            .filter(i => i.src.startsWith('file:') && !(i.complete && i.naturalWidth > 0))
            .map(i => i.src)""")
        assert not broken, f"{page_name}: images that did not load: {broken}"
        external = page.evaluate("""() => [...document.querySelectorAll('img')]
            .filter(i => !i.src.startsWith('file:') && !i.alt).map(i => i.src)""")
        assert not external, f"{page_name}: external images without alt text (shown broken offline): {external}"
    finally:
        page.close()


@pytest.mark.parametrize("page_name", PAGES)
def test_math_is_typeset(browser, site, page_name):
    """No raw TeX delimiters in the page's text outside code, and typeset math where the page holds math."""
    page = _open(browser, site, page_name, "desktop")
    try:
        raw = page.evaluate("""(delims) => {
            const skip = 'pre, code, script, style, template, textarea, mjx-container';
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            const found = [];
            for (let n = walker.nextNode(); n; n = walker.nextNode()) {
                if (!n.parentElement || n.parentElement.closest(skip)) continue;
                const text = n.textContent;
                for (const d of delims) {
                    const i = text.indexOf(d);
                    if (i >= 0) { found.push(text.slice(Math.max(0, i - 30), i + 50).trim()); break; }
                }
            }
            return found;
        }""", list(RAW_TEX))
        assert not raw, (f"{page_name}: raw TeX in the page ({len(raw)} text nodes; MathJax did not typeset "
                         f"them): {raw[:5]}")
        if page_name in MATH_PAGES:
            typeset = page.locator("mjx-container").count()
            assert typeset >= 1, f"{page_name}: no typeset math (no mjx-container) on a page that holds math"
    finally:
        page.close()


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
@pytest.mark.parametrize("page_name", PAGES)
def test_no_figure_or_table_wider_than_the_column(browser, site, page_name, viewport):
    page = _open(browser, site, page_name, viewport)
    try:
        wide = page.evaluate("""() => {
            const article = document.querySelector('article.bd-article') || document.querySelector('article');
            const box = article.getBoundingClientRect(), cs = getComputedStyle(article);
            const left = box.left + parseFloat(cs.paddingLeft), right = box.right - parseFloat(cs.paddingRight);
            return [...article.querySelectorAll('img, figure, table, svg')]
              .map(e => [e, e.getBoundingClientRect()])
              .filter(([e, r]) => r.width > 0 && (r.left < left - 1 || r.right > right + 1))
              .map(([e, r]) => `${e.tagName.toLowerCase()} ${Math.round(r.width)} px wide at `
                             + `${Math.round(r.left)}..${Math.round(r.right)}, column ${Math.round(left)}..`
                             + `${Math.round(right)}: ${(e.getAttribute('src') || e.textContent).slice(0, 60)}`);
        }""")
        assert not wide, f"{page_name} ({viewport}): wider than the content column: {wide[:5]}"
    finally:
        page.close()


@pytest.mark.parametrize("stem", SCREENSHOT_PAGES)
def test_screenshot(browser, site, stem):
    """Full-page screenshots of the main chapters, kept as CI artifacts in _build/screenshots/."""
    page = _open(browser, site, f"book/{stem}.html", "desktop")
    try:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.evaluate("() => window.scrollTo(0, 0)")  # the sticky header belongs at the top of the shot
        page.screenshot(path=str(SCREENSHOTS / f"{stem}.png"), full_page=True)
    finally:
        page.close()
    assert (SCREENSHOTS / f"{stem}.png").stat().st_size > 0


@pytest.mark.parametrize("page_name", CHAPTERS)
def test_every_chapter_has_its_banner(browser, site, page_name):
    page = _open(browser, site, page_name, "desktop")
    try:
        assert page.locator(".flatnb-banner").count() >= 1, f"{page_name}: no .flatnb-banner at the top"
    finally:
        page.close()


def test_the_checks_fail_on_a_bad_page(browser, tmp_path):
    """A page with a raw table, a broken image, an over-wide figure or raw TeX fails each check."""
    (tmp_path / "bad.html").write_text(
        "<html><body><article class='bd-article' style='width:300px'><p>| a | b |\n|\u2014|\u2014|</p>"
        "<img src='missing.png' alt='x'><img src='wide.svg' style='width:900px'></article></body></html>")
    (tmp_path / "wide.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg' width='900' height='10'/>")
    with pytest.raises(AssertionError, match="raw Markdown table"):
        test_page_in_a_browser(browser, tmp_path, "bad.html")
    (tmp_path / "bad.html").write_text((tmp_path / "bad.html").read_text().replace("|\u2014|\u2014|", ""))
    with pytest.raises(AssertionError, match="did not load"):
        test_page_in_a_browser(browser, tmp_path, "bad.html")
    with pytest.raises(AssertionError, match="wider than the content column"):
        test_no_figure_or_table_wider_than_the_column(browser, tmp_path, "bad.html", "desktop")
    # raw TeX and no MathJax (what a CDN-only page shows offline); then a math page with no typeset math
    (tmp_path / "tex.html").write_text(
        "<html><body><article><p>The bound <span class='math'>\\(x^2\\)</span> holds.</p>"
        "<pre>code may say \\(x\\)</pre></article></body></html>")
    with pytest.raises(AssertionError, match=r"raw TeX in the page \(1 text nodes"):
        test_math_is_typeset(browser, tmp_path, "tex.html")
    (tmp_path / MATH_PAGES[0]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / MATH_PAGES[0]).write_text("<html><body><article><p>x squared</p></article></body></html>")
    with pytest.raises(AssertionError, match="no typeset math"):
        test_math_is_typeset(browser, tmp_path, MATH_PAGES[0])
