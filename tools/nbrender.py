"""Render notebooks to Markdown (README) and HTML (docs) without Quarto, honouring nbdev's cell directives.

Quarto cannot be installed on every machine (its installer downloads from GitHub), and `nbdev_readme`,
`nbdev_docs`, `nbdev_prepare` and `nbdev_proc_nbs` all call it. This script does the two jobs we need with
nbconvert, applying the same cell directives Quarto would:

- `#|hide`, `#| include: false`: the cell is left out;
- `#| echo: false`: the code is left out, its output kept;
- `#| output: false`: the output is left out;
- `#|export`, `#|exporti`, `#|exports`, `#|default_exp`: directive lines are stripped, code kept
  (cells that only hold `#|default_exp` are dropped).

Usage:
    python tools/nbrender.py readme [--check]      # nbs/index.ipynb -> README.md
    python tools/nbrender.py docs [--out _docs]    # every nbs/*.ipynb (and sub-folders) -> HTML pages
"""
from __future__ import annotations
import argparse, copy, difflib, re, sys
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter, MarkdownExporter
from nbdev.process import extract_directives

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
_FALSE = {"false", "False", "0", "no"}


def _flag(dirs: dict, key: str) -> bool:
    "Is the Quarto-style directive `key` set to false?"
    v = dirs.get(key)
    return bool(v) and str(v[0]) in _FALSE


def filter_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    "Apply nbdev/Quarto cell directives to a copy of `nb`"
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            cells.append(cell); continue
        dirs = extract_directives(cell, remove=True)
        if "hide" in dirs or _flag(dirs, "include"): continue
        src = "\n".join(l for l in cell.source.splitlines() if not re.match(r"\s*#\s*\|", l)).strip()
        if "default_exp" in dirs and not src: continue
        cell.source = src
        if _flag(dirs, "output"): cell.outputs = []
        if _flag(dirs, "echo"):
            cell.source = ""
            cell.metadata["transient"] = {"remove_source": True}
        if not cell.source and not cell.outputs: continue
        cells.append(cell)
    nb.cells = cells
    return nb


def _plain_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    "Keep only the plain-text form of rich outputs (GitHub strips the HTML nbconvert emits for tables)"
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "text/plain" in data and "text/html" in data: del data["text/html"]
    return nb


def render_readme(nb_path: Path = NBS / "index.ipynb") -> str:
    "Render `nb_path` to README Markdown"
    nb = _plain_outputs(filter_notebook(nbformat.read(nb_path, as_version=4)))
    nb.metadata["language_info"] = {"name": "python"}
    exp = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True)
    body, res = exp.from_notebook_node(nb)
    if res.get("outputs"):
        raise SystemExit(f"{nb_path} has image outputs; README.md must be self-contained: move figures elsewhere")
    header = ("<!-- Generated from nbs/index.ipynb by `python tools/nbrender.py readme`: edit the notebook, "
              "not this file. -->\n\n")
    return header + re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"


def cmd_readme(check: bool) -> int:
    text, out = render_readme(), ROOT / "README.md"
    if check:
        old = out.read_text(encoding="utf-8") if out.exists() else ""
        if old != text:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                       "README.md (committed)", "README.md (from nbs/index.ipynb)"))
            print("README.md is out of date: run `python tools/nbrender.py readme` and commit it.", file=sys.stderr)
            return 1
        print("README.md is up to date with nbs/index.ipynb")
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def cmd_docs(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    exp = HTMLExporter(template_name="lab", exclude_input_prompt=True, exclude_output_prompt=True)
    pages = []
    for nb_path in sorted(NBS.rglob("*.ipynb")):
        rel = nb_path.relative_to(NBS)
        if any(p.startswith(("_", ".")) for p in rel.parts): continue
        nb = filter_notebook(nbformat.read(nb_path, as_version=4))
        title = next((l[2:].strip() for c in nb.cells if c.cell_type == "markdown"
                      for l in c.source.splitlines() if l.startswith("# ")), rel.stem)
        html, _ = exp.from_notebook_node(nb, resources={"metadata": {"name": title}})
        dest = out / rel.with_suffix(".html")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(html, encoding="utf-8")
        pages.append((rel.with_suffix(".html").as_posix(), title))
    links = "\n".join(f'<li><a href="{href}">{title}</a></li>' for href, title in pages)
    (out / "toc.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>lesiongen docs</title>"
                                  f"</head><body><h1>lesiongen</h1><ul>{links}</ul></body></html>\n", encoding="utf-8")
    print(f"wrote {len(pages)} pages to {out} (open {out / 'toc.html'})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("readme", help="nbs/index.ipynb -> README.md")
    r.add_argument("--check", action="store_true", help="fail if README.md differs from what would be written")
    d = sub.add_parser("docs", help="all notebooks -> HTML pages with their committed outputs")
    d.add_argument("--out", type=Path, default=ROOT / "_docs")
    a = p.parse_args(argv)
    return cmd_readme(a.check) if a.cmd == "readme" else cmd_docs(a.out)


if __name__ == "__main__":
    sys.exit(main())
