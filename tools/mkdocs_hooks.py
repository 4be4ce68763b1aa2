"""mkdocs hooks (listed under `hooks:` in mkdocs.yml).

mkdocs-jupyter writes one MathJax `<script src=...>` URL into every notebook page. `mkdocs.yml` sets it to a
placeholder, and this hook replaces it on each page with the page-relative path of the MathJax copy that
`tools/docs_site.py prep` puts in `assets/mathjax/`, so math renders without a CDN, at any page depth and under
any base URL (GitHub Pages serves the site under /lesiongen/). It also rebuilds each notebook page's table of
contents from the headings the page really has, and gives heading permalinks material's class (see
`on_page_content`).
"""
import re

from mkdocs.structure.toc import get_toc
from mkdocs.utils import get_relative_url

PLACEHOLDER = "@MATHJAX_ROOT@"
MATHJAX_DIR = "assets/mathjax"


_HEADING = re.compile(r'<h([1-6])\b[^>]*\bid="([^"]+)"[^>]*>(.*?)</h\1>', re.DOTALL)
_ANCHOR = re.compile(r'<a\b[^>]*class="headerlink"[^>]*>.*?</a>', re.DOTALL)
_TAG = re.compile(r"<[^>]+>")


def _toc_tokens(html: str, depth: int) -> list[dict]:
    "Nested mkdocs TOC tokens from the `<hN id=...>` headings of `html`, down to level `depth`"
    root: list[dict] = []
    stack: list[dict] = []
    for level, hid, inner in _HEADING.findall(html):
        level = int(level)
        if level > depth: continue
        tok = {"level": level, "id": hid, "name": _TAG.sub("", _ANCHOR.sub("", inner)).strip(), "children": []}
        while stack and stack[-1]["level"] >= level: stack.pop()
        (stack[-1]["children"] if stack else root).append(tok)
        stack.append(tok)
    return root


def on_page_content(html, page, config, files):
    "Point the page's MathJax script at the site's own copy; rebuild a notebook page's table of contents"
    if PLACEHOLDER not in html: return html  # not a notebook page (mkdocs-jupyter adds the MathJax script)
    # nbconvert's heading permalinks (¶) as material's own: shown on hover, and kept out of the search index
    html = html.replace('class="anchor-link"', 'class="headerlink"')
    # mkdocs-jupyter derives the table of contents from a Markdown export, whose ids differ from the page's for
    # headings holding `code` ("Per entry: `write_entries`" -> #per-entry vs id="per-entry-write_entries"):
    # take the ids the page really has.
    depth = config.plugins["mkdocs-jupyter"].config["toc_depth"]
    page.toc = get_toc(_toc_tokens(html, depth))
    return html.replace(PLACEHOLDER, get_relative_url(MATHJAX_DIR, page.url))
