"""The documentation site, as a reader's browser shows it.

Builds the site with `tools/docs_site.py build` (mkdocs-material + mkdocs-jupyter, what `make docs` runs) into a
temporary folder, serves it from 127.0.0.1 with `http.server`, and opens every page in headless Chromium
(Debian's `chromium`, driven by playwright through `executable_path`; `playwright install` is never needed).

Checks: the navigation lists every notebook in notebook order; each page loads with no console error, no
uncaught exception, no failed or >= 400 request and no request leaving 127.0.0.1 (the site is self-contained:
fonts, MathJax and search are local); every `<img>` decodes with a non-zero natural width, and each page shows
at least as many as its notebook has committed figures; no raw TeX is left untypeset; every internal link
(navigation, table of contents, content) answers 200 and its `#fragment` exists; material's search box finds
`assess_fairness`. Screenshots go to $LESIONGEN_SCREENSHOTS (default tests/artifacts/) for CI to keep.

Without Chromium the test fails and says how to install it (`apt-get install chromium`); set
LESIONGEN_SKIP_BROWSER=1 to skip it instead.
"""
from __future__ import annotations
import functools, http.server, os, re, shutil, subprocess, sys, threading, time, urllib.error, urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import docs_site  # noqa: E402

SKIP_ENV = "LESIONGEN_SKIP_BROWSER"
INSTALL = "apt-get install -y chromium"
SHOTS = Path(os.environ.get("LESIONGEN_SCREENSHOTS") or ROOT / "tests" / "artifacts")
SEARCH_TERM, SEARCH_PAGE = "assess_fairness", "08_fairness/"
# Console messages that are not the site's fault. Empty: every console error fails the test.
IGNORED_CONSOLE: list[re.Pattern] = []
# Untypeset TeX: `$...\command...$` left in the page text (outside code) after MathJax has run
RAW_TEX = re.compile(r"\$[^$\n]*\\[A-Za-z]+[^$\n]*\$")


def _chromium() -> str | None:
    "Debian's Chromium binary (the /usr/bin/chromium wrapper also works), or $LESIONGEN_CHROMIUM"
    for c in (os.environ.get("LESIONGEN_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK): return c
    return None


@pytest.fixture(scope="module")
def chromium():
    if os.environ.get(SKIP_ENV) == "1": pytest.skip(f"{SKIP_ENV}=1: browser test of the docs site skipped")
    exe = _chromium()
    if exe is None:
        pytest.fail(f"Chromium not found: the docs-site browser test needs it. Install it with `{INSTALL}` "
                    f"(as root; Debian/Ubuntu), or set {SKIP_ENV}=1 to skip this test.", pytrace=False)
    try: import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]' (no `playwright install`: the system "
                    "Chromium is used)", pytrace=False)
    return exe


def _page_url(rel: Path) -> str:
    "mkdocs' directory URL of the notebook at `rel` (relative to nbs/)"
    stem = rel.with_suffix("")
    return (stem.parent.as_posix() + "/" if stem.parent != Path(".") else "") if stem.name == "index" \
        else stem.as_posix() + "/"


@pytest.fixture(scope="module")
def site(chromium, tmp_path_factory):
    "Build the site (as `make docs` does) into a temporary folder: (site_dir, proc_dir, {url: path in nbs/})"
    tmp = tmp_path_factory.mktemp("docs_site")
    site_dir, proc_dir = tmp / "site", tmp / "proc"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "docs_site.py"), "build", "--proc-dir", str(proc_dir),
                        "--site-dir", str(site_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"docs build failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}", pytrace=False)
    print(f"docs build: {time.perf_counter() - t0:.1f} s")
    pages = {_page_url(p.relative_to(docs_site.NBS)): p.relative_to(docs_site.NBS)
             for p in docs_site.source_notebooks(docs_site.NBS)}  # nbs/, in navigation order
    return site_dir, proc_dir, pages


class _Handler(http.server.SimpleHTTPRequestHandler):
    statuses: list  # (path, status) of every request, set per server

    def log_message(self, *args): pass

    def log_request(self, code="-", size="-"):
        self.statuses.append((self.path, int(code) if str(code).isdigit() else code))


@pytest.fixture(scope="module")
def server(site):
    "The site served from 127.0.0.1 on a free port: (base URL, request log)"
    statuses = []
    handler = type("H", (_Handler,), {"statuses": statuses})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site[0])))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/", statuses
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


@dataclass
class Visit:
    "What loading one page showed"
    console_errors: list = field(default_factory=list)
    page_errors: list = field(default_factory=list)
    failed: list = field(default_factory=list)      # requests that failed or answered >= 400
    external: list = field(default_factory=list)    # requests to anywhere but the local server (blocked)
    images: list = field(default_factory=list)      # (naturalWidth, src prefix) of each <img> in the article
    links: list = field(default_factory=list)       # absolute href of every <a> on the page
    bad_fragments: list = field(default_factory=list)  # same-page #links without a target
    raw_tex: list = field(default_factory=list)
    typeset: int = 0                                 # MathJax-rendered formulas
    nav: list = field(default_factory=list)          # primary navigation hrefs, in order


_IMAGES_JS = """async () => Promise.all([...document.querySelectorAll('article img')].map(async img => {
    try { await img.decode(); } catch (e) {}
    return [img.naturalWidth, img.getAttribute('src').slice(0, 40)]; }))"""
_TEXT_JS = """() => { const a = document.querySelector('article').cloneNode(true);
    a.querySelectorAll('pre, code, script, .MathJax_Preview, .MathJax, .MJX_Assistive_MathML').forEach(e => e.remove());
    return a.textContent; }"""
_FRAGMENTS_JS = """() => [...document.querySelectorAll('a[href^="#"]')].map(a => a.getAttribute('href'))
    .filter(h => h.length > 1 && !document.getElementById(decodeURIComponent(h.slice(1))))"""
_MATHJAX_IDLE_JS = """() => !window.MathJax || !MathJax.Hub || (MathJax.Hub.queue.pending === 0
    && MathJax.Hub.queue.running === 0 && !document.querySelector('.MathJax_Processing'))"""


def _visit(page, url: str, base: str, v: Visit) -> Visit:
    "Load `url` and fill `v` (its error lists are filled by the page's event handlers meanwhile)"
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    page.wait_for_function(_MATHJAX_IDLE_JS)
    v.images = page.evaluate(_IMAGES_JS)
    v.links = page.eval_on_selector_all("a[href]", "els => els.map(a => a.href)")
    v.bad_fragments = page.evaluate(_FRAGMENTS_JS)
    v.raw_tex = RAW_TEX.findall(page.evaluate(_TEXT_JS))
    v.typeset = page.evaluate("() => document.querySelectorAll('article .MathJax').length")
    nav = page.eval_on_selector_all("nav.md-nav--primary a.md-nav__link[href]", "els => els.map(a => a.href)")
    v.nav = list(dict.fromkeys(urldefrag(h)[0][len(base):] for h in nav if h.startswith(base) and "#" not in h))
    return v


@pytest.fixture(scope="module")
def visits(site, server, browser):
    "Open every page of the site once, recording what happened: {page url: Visit}"
    _, _, pages = site
    base, _ = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(120_000)  # pages are 1-3 MB (inlined notebook CSS, base64 figures): slow on a busy CPU
    page = context.new_page()
    current: list[Visit] = [Visit()]

    def route(r):
        if r.request.url.startswith((base, "data:", "blob:")): return r.continue_()
        current[0].external.append(r.request.url)
        return r.abort()

    def console(m):
        if m.type == "error" and not any(p.search(m.text) for p in IGNORED_CONSOLE):
            current[0].console_errors.append(f"{m.text} @ {m.location.get('url', '')}")

    page.route("**/*", route)
    page.on("console", console)
    page.on("pageerror", lambda e: current[0].page_errors.append(str(e)))
    page.on("requestfailed", lambda r: r.url.startswith(base) and current[0].failed.append(f"{r.url}: {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and current[0].failed.append(f"{r.url}: HTTP {r.status}"))
    out = {}
    for url in pages:
        current[0] = out[url] = Visit()
        try: _visit(page, base + url, base, out[url])
        except Exception as e: raise AssertionError(f"loading /{url} failed: {e}") from e
        if url == "":
            page.screenshot(path=str(SHOTS / "home.png"), animations="disabled")
        if url == SEARCH_PAGE or (SEARCH_PAGE not in pages and url == next(iter(pages))):
            page.screenshot(path=str(SHOTS / "notebook_page.png"), animations="disabled")
            fig = page.query_selector("article img")
            if fig:
                fig.scroll_into_view_if_needed()
                page.screenshot(path=str(SHOTS / "notebook_figure.png"), animations="disabled")
    yield out
    context.close()


def _figures(nb_path: Path) -> int:
    "Committed image outputs shown as <img> (png/jpeg/gif) in a processed notebook"
    nb = nbformat.read(nb_path, as_version=4)
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if set(o.get("data", {})) & {"image/png", "image/jpeg", "image/gif"})


def test_site_has_a_page_per_notebook(site):
    site_dir, _, pages = site
    rels = [p.parent.relative_to(site_dir) for p in site_dir.rglob("index.html")]
    built = {"" if rel == Path(".") else rel.as_posix() + "/" for rel in rels
             if not (rel.parts and rel.parts[0] in ("assets", "search"))}
    assert "" in pages and "00_core/" in pages and SEARCH_PAGE in pages, sorted(pages)
    assert built == set(pages), f"built {sorted(built)} but the notebooks are {sorted(pages)}"


def test_navigation_follows_notebook_order(site, visits):
    _, _, pages = site
    expected = list(pages)  # source_notebooks order: index, 00_core ... 11_cli, then sub-folders (tutorials/)
    for url, v in visits.items():
        assert v.nav == expected, f"navigation on /{url}: {v.nav}\nexpected {expected}"


def test_every_page_loads_without_errors(visits):
    problems = {url: {k: getattr(v, k) for k in ("console_errors", "page_errors", "failed", "external")
                      if getattr(v, k)} for url, v in visits.items()}
    problems = {url: p for url, p in problems.items() if p}
    assert not problems, f"pages with errors: {problems}"


def test_every_figure_decodes(site, visits):
    _, proc_dir, pages = site
    committed_total = 0
    for url, v in visits.items():
        committed = _figures(proc_dir / pages[url])
        committed_total += committed
        broken = [src for w, src in v.images if not w]
        assert not broken, f"/{url}: images that do not decode: {broken}"
        assert len(v.images) >= committed, f"/{url}: {len(v.images)} <img> shown, notebook has {committed} figures"
    assert committed_total >= 10, f"only {committed_total} committed figures in the whole site"


def test_math_is_typeset(visits):
    assert not {u: v.raw_tex for u, v in visits.items() if v.raw_tex}, "raw TeX left in pages"
    assert sum(v.typeset for v in visits.values()) >= 10, "MathJax typeset almost nothing"
    if "04_model/" in visits: assert visits["04_model/"].typeset > 0


def test_links_resolve(visits, server):
    base, statuses = server
    bad = {u: v.bad_fragments for u, v in visits.items() if v.bad_fragments}
    assert not bad, f"#links without a target on the same page: {bad}"
    targets: dict[str, set] = {}
    for v in visits.values():
        for href in v.links:
            if not href.startswith(base): continue  # external (GitHub source links): not fetched, no network
            url, frag = urldefrag(href)
            targets.setdefault(url, set()).update([frag] if frag else [])
    assert len(targets) >= len(visits), f"too few internal links: {sorted(targets)}"
    broken = []
    for url, frags in sorted(targets.items()):
        try:
            with urllib.request.urlopen(url, timeout=10) as r: status, body = r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e: status, body = e.code, ""
        if status != 200: broken.append(f"{url}: HTTP {status}"); continue
        broken += [f"{url}#{f}: no such id" for f in frags if f'id="{unquote(f)}"' not in body]
    assert not broken, "\n".join(broken)
    served_badly = [s for s in statuses if s[1] not in (200, 304)]  # every request the server saw so far
    assert not served_badly, served_badly


def test_search_finds_a_function(server, browser):
    base, _ = server
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(base, wait_until="load")
        box = page.locator("input.md-search__input")
        box.click()
        box.press_sequentially(SEARCH_TERM, delay=20)
        # a hit on the function's own section (its show_doc heading) of the page that defines it
        # (material's search.highlight puts `?h=term` between the page and the #fragment)
        hit = page.locator(f"a.md-search-result__link[href*='/{SEARCH_PAGE}'][href$='#{SEARCH_TERM}']").first
        hit.wait_for(state="visible", timeout=60_000)
        page.screenshot(path=str(SHOTS / "search.png"), animations="disabled")
        assert SEARCH_TERM in hit.inner_text(), hit.inner_text()
        hit.click()
        page.wait_for_load_state("load")
        assert urlsplit(page.url).path.endswith("/" + SEARCH_PAGE) and urlsplit(page.url).fragment == SEARCH_TERM, \
            page.url
        assert page.locator(f"[id='{SEARCH_TERM}']").count() == 1
    finally:
        context.close()
