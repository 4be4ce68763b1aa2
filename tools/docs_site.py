"""Build the documentation site with mkdocs-material + mkdocs-jupyter from the executed notebooks in `nbs/`.

Quarto (what `nbdev_docs` uses) cannot be installed on every machine, so the site is built by mkdocs. Two steps:

1. `prep`: every notebook in `nbs/` (and its sub-folders such as `nbs/tutorials/`; names starting with `_` or
   `.` are skipped) is copied to a build folder (`_proc_docs/`, git-ignored) after the nbdev processing Quarto
   would get:
   - the API reference, by nbdev's own processors, as `nbdev_docs` makes it: `add_show_docs` adds a
     `show_doc(name)` cell after each exported cell for every public function/class it defines that has none,
     and `exec_show_docs` runs the imports-only, exported and `show_doc` cells (definitions: seconds) to render
     them. No other cell is run (nbdev would also run cells mixing imports with other code; here they are not),
     and every cell but `show_doc` keeps its committed outputs and figures.
   - `show_doc` cells show their output only (nbdev's `clean_show_doc`: `#| echo: false`); the Quarto link
     attributes in their output (`[source](url){target=...}`) become plain HTML links.
   - the cell directives are applied by `filter_notebook` from `tools/nbrender.py` (`#|hide` dropped, `#|export`
     lines stripped, `#| echo/output/include: false` honoured).
   - ipywidgets outputs (tqdm bars) keep their text fallback; the widget state is dropped, since rendering it
     needs a script from a CDN.
   - images beside the notebooks (png/jpg/gif/svg/webp, e.g. a tutorial's `![](fig.png)`) are copied along.
   - MathJax 2 from the `jupyter-server-mathjax` wheel is copied to `assets/mathjax/`, so math renders offline.
2. `build`: `prep`, then `mkdocs build` with `mkdocs.yml` (docs_dir and site_dir can be overridden).

Navigation is mkdocs' automatic one, which follows file names: `index` first, then `00_core` ... `11_cli`, then
each sub-folder as a section (`nbs/tutorials/*.ipynb` appear under "Tutorials" without any edit here).

Usage:
    python tools/docs_site.py prep  [--proc-dir _proc_docs]
    python tools/docs_site.py build [--proc-dir _proc_docs] [--site-dir _docs]    # what `make docs` runs
    mkdocs serve                                                                   # after `prep`: live preview
"""
from __future__ import annotations
import argparse, ast, logging, os, re, shutil, sys, time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbrender import NBS, ROOT, filter_notebook  # noqa: E402

log = logging.getLogger("docs_site")
MARKER = ".docs_site_build"  # marks a folder `prep` made, so it only ever deletes its own output
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
REMOVE_INPUT_TAG = "remove_input"  # mkdocs.yml's mkdocs-jupyter remove_tag_config hides these cells' source
# The wheel's MathJax 2 ships only the STIX-Web fonts: use them (as Jupyter does), never the TeX ones it lacks.
# Loaded as `?config=...,local/lesiongen` (see mkdocs.yml), MathJax's documented way to add a local config file.
# - MathJax_Blank is MathJax's empty fallback font: its stock `url('about:blank')` source is refused by Chromium
#   with a console error (so the font is absent there anyway); `local()` gives the same without a request.
# - The NativeMML jax declares @font-face rules for the TeX .otf fonts (absent from the wheel) that the hidden
#   assistive MathML copy would fetch (404s); without them that hidden copy uses system fonts.
MATHJAX_LOCAL_CONFIG = """MathJax.Hub.Config({
  MMLorHTML: {prefer: "HTML"},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null,
               styles: {"@font-face": {"font-family": "MathJax_Blank", src: "local('MathJax_Blank')"}}},
  SVG: {font: "STIX-Web"}
});
MathJax.Hub.Register.StartupHook("NativeMML Jax Config", function () {
  var styles = MathJax.OutputJax.NativeMML.config.styles;
  for (var k in styles) if (k.indexOf("@font-face") === 0) delete styles[k];
});
MathJax.Ajax.loadComplete("[MathJax]/config/local/lesiongen.js");
"""
_WIDGET = "application/vnd.jupyter.widget-view+json"
_QUARTO_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)\{([^}]*)\}")  # [text](url){attrs} -> <a href=url attrs>


def source_notebooks(nbs: Path = NBS) -> list[Path]:
    "The notebooks the site shows, in navigation order (top-level ones first, then each sub-folder's)"
    paths = [p for p in nbs.rglob("*.ipynb")
             if not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts)]
    def key(p):
        rel = p.relative_to(nbs)
        return len(rel.parts) > 1, rel.parts[:-1], p.stem != "index", p.name
    return sorted(paths, key=key)


def source_files(nbs: Path = NBS, exts=IMAGE_EXTS) -> list[Path]:
    "Files with these extensions beside the notebooks (same skipping rule as `source_notebooks`)"
    return sorted(p for p in nbs.rglob("*") if p.suffix.lower() in exts and p.is_file()
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts))


def _runs(cell) -> bool:
    "Does the API reference need `cell` run: an exported cell, an imports-only cell or a `show_doc` call?"
    if cell.cell_type != "code" or not cell.source.strip(): return False
    if cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}: return True
    try: body = ast.parse("\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))).body
    except SyntaxError: return False
    return bool(body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body) or _is_show_doc(cell)


def _with_show_docs(path: Path) -> nbformat.NotebookNode:
    "`path` with its API reference: nbdev's `add_show_docs` + `exec_show_docs` (directive lines kept for `filter_notebook`)"
    from execnb.nbio import nb2str, read_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import add_show_docs, exec_show_docs

    class exec_api_cells(exec_show_docs):
        "nbdev's `exec_show_docs`, except that cells mixing imports with other code (demos) are not run"
        def __call__(self, cell):
            if _runs(cell): super().__call__(cell)

    nb = read_nb(path)
    committed = [(c, c.get("outputs")) for c in nb.cells if c.cell_type == "code"]
    os.environ["IN_TEST"] = "1"  # as nbdev's own docs processing runs notebook code
    try: NBProcessor(nb=nb, procs=[add_show_docs, exec_api_cells], rm_directives=False).process()
    finally: os.environ.pop("IN_TEST", None)
    for cell, outputs in committed:  # every cell but show_doc keeps what the notebook committed
        if not _is_show_doc(cell): cell["outputs"] = outputs
    for cell in nb.cells:
        cell.pop("has_sd", None)  # nbdev's marker on the cells it adds: not valid nbformat
        if cell.cell_type == "code" and not cell.get("execution_count"): cell["execution_count"] = None
        if _is_show_doc(cell): cell.source = "#| echo: false\n" + cell.source  # as nbdev's clean_show_doc
    return nbformat.reads(nb2str(nb), as_version=4)


def _is_show_doc(cell) -> bool:
    "Does `cell` only call `show_doc` (nbdev shows its output, not its source)?"
    if cell.cell_type != "code": return False
    src = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith("#")).strip()
    return src.startswith("show_doc(") and src.endswith(")") and "\n" not in src


def _clean_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    "Quarto link attributes -> HTML links; widget views -> their text fallback; no widget state"
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        outs = []
        for o in cell.outputs:
            data = o.get("data")
            if data is not None:
                data.pop(_WIDGET, None)
                if "text/markdown" in data:
                    md = data["text/markdown"]
                    md = "".join(md) if isinstance(md, list) else md
                    data["text/markdown"] = _QUARTO_LINK.sub(lambda m: f'<a href="{m[2]}" {m[3]}>{m[1]}</a>', md)
                if not data: continue
            outs.append(o)
        cell.outputs = outs
    return nb


def prep_notebook(path: Path) -> nbformat.NotebookNode:
    "The notebook at `path` as the site shows it"
    nb = filter_notebook(_clean_outputs(_with_show_docs(path)))
    for cell in nb.cells:  # `#| echo: false`: nbformat drops `transient` on write; a tag survives (see mkdocs.yml)
        if cell.metadata.pop("transient", {}).get("remove_source"):
            cell.metadata["tags"] = [*cell.metadata.get("tags", []), REMOVE_INPUT_TAG]
    return nb


def _mathjax_dir() -> Path:
    try: import jupyter_server_mathjax
    except ImportError as e:
        raise SystemExit("jupyter-server-mathjax is missing (it ships MathJax for offline math): "
                         "pip install -e '.[dev]'") from e
    return Path(jupyter_server_mathjax.__file__).parent / "static"


def prep(proc_dir: Path = ROOT / "_proc_docs", nbs: Path = NBS) -> list[Path]:
    "Write the processed notebooks and MathJax to `proc_dir` (replacing an earlier `prep` output); return the pages"
    proc_dir = Path(proc_dir)
    if proc_dir.exists():
        if not (proc_dir / MARKER).exists() and any(proc_dir.iterdir()):
            raise SystemExit(f"{proc_dir} exists and was not made by this script: refusing to delete it")
        shutil.rmtree(proc_dir)
    proc_dir.mkdir(parents=True)
    (proc_dir / MARKER).write_text("made by tools/docs_site.py prep; deleted and rewritten on each run\n")
    pages = []
    for path in source_notebooks(nbs):
        t0, dest = time.perf_counter(), proc_dir / path.relative_to(nbs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(prep_notebook(path), dest)
        pages.append(dest)
        log.debug("%s: %.1f s", path.relative_to(nbs), time.perf_counter() - t0)
    for path in source_files(nbs):  # images a notebook links to (`![](fig.png)`), e.g. in tutorials
        dest = proc_dir / path.relative_to(nbs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    mathjax = proc_dir / "assets" / "mathjax"
    shutil.copytree(_mathjax_dir(), mathjax)
    (mathjax / "config" / "local").mkdir(exist_ok=True)
    (mathjax / "config" / "local" / "lesiongen.js").write_text(MATHJAX_LOCAL_CONFIG)
    log.info("prepared %d notebooks in %s", len(pages), proc_dir)
    return pages


def build(site_dir: Path = ROOT / "_docs", proc_dir: Path = ROOT / "_proc_docs", strict: bool = True) -> Path:
    "`prep` then `mkdocs build` into `site_dir`"
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    prep(proc_dir)
    cfg = load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(Path(proc_dir).resolve()),
                      site_dir=str(Path(site_dir).resolve()), strict=strict)
    mkdocs_build(cfg)
    return Path(site_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help in (("prep", "processed notebooks -> --proc-dir"), ("build", "prep, then mkdocs build")):
        s = sub.add_parser(name, help=help)
        s.add_argument("--proc-dir", type=Path, default=ROOT / "_proc_docs")
        s.add_argument("-v", "--verbose", action="store_true", help="time each notebook")
        if name == "build": s.add_argument("--site-dir", type=Path, default=ROOT / "_docs")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)-7s -  %(message)s")
    t0 = time.perf_counter()
    if a.cmd == "prep": prep(a.proc_dir)
    else: build(a.site_dir, a.proc_dir)
    log.info("%s took %.1f s", a.cmd, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
