"""The self-contained ``report.html``: tables, plots (PNG embedded as base64), gallery, statistics and the
run manifest, on one page with no external resource.

Every section has a fixed ``id`` (:data:`SECTIONS`) so tests and readers can link to it.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

SECTIONS = {
    "summary": "Summary",
    "table1": "Table 1: accuracy, time and success per method",
    "per-tissue": "Per tissue",
    "per-status": "Per pair status (ANHIR training / evaluation) and row status",
    "figure2": "Figure 2: cumulative distribution of landmark rTRE",
    "plots": "More plots",
    "quality": "Quality: does the landmark-free score predict success?",
    "downstream": "Downstream: what a start is worth to a nonrigid stage",
    "statistics": "Statistics",
    "gallery": "Failure gallery",
    "manifest": "Run manifest",
    "definitions": "Definitions",
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1em 2em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0.2em} h2{border-bottom:2px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}
h3{margin-bottom:0.3em} nav a{margin-right:1em;white-space:nowrap}
table.results{border-collapse:collapse;margin:0.5em 0 1em 0;font-size:0.88em}
table.results th,table.results td{border:1px solid #ccc;padding:3px 7px}
table.results th{background:#f1f3f6;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
table.results tbody tr:nth-child(even){background:#fafafa}
figure{margin:0.8em 0 1.5em 0} figure img{max-width:min(100%,1100px);border:1px solid #eee}
figcaption{font-size:0.88em;color:#555}
.warn{background:#fdecea;border-left:6px solid #c62828;padding:0.6em 0.9em;font-weight:600;font-size:1.05em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.4em 0.8em}
pre{background:#f6f8fa;padding:0.6em;overflow-x:auto;font-size:0.8em} .muted{color:#666;font-size:0.88em}
dl.kv dt{font-weight:600;float:left;clear:left;width:11em} dl.kv dd{margin-left:12em}
"""


def img_tag(path: Path, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figure(path: Path, caption: str, links: dict[str, str] | None = None) -> str:
    """A ``<figure>`` with an embedded PNG, its caption and links to the other formats."""
    extra = ""
    if links:
        extra = " " + " ".join(
            f'<a href="{html.escape(href)}">{html.escape(k)}</a>' for k, href in links.items()
        )
    return f"<figure>{img_tag(path, caption)}<figcaption>{html.escape(caption)}{extra}</figcaption></figure>"


def section(sid: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(SECTIONS[sid])}</h2>\n{body}\n</section>'


def _kv(items: dict[str, Any]) -> str:
    rows = []
    for key, value in items.items():
        if isinstance(value, dict | list):
            text = f"<pre>{html.escape(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"
        else:
            text = html.escape(str(value))
        rows.append(f"<dt>{html.escape(str(key))}</dt><dd>{text}</dd>")
    return f'<dl class="kv">{"".join(rows)}</dl>'


def manifest_html(runs: list) -> str:
    """Each run's manifest: the headline facts first, the rest as JSON."""
    parts = []
    head = ("command", "git_commit", "created", "device", "success_threshold", "schema_version")
    for run in runs:
        m = run.manifest
        facts = {k: m[k] for k in head if k in m}
        facts["folder"] = str(run.path)
        nested = {k: m[k] for k in ("machine", "packages", "dataset", "preprocess", "methods") if k in m}
        rest = {k: v for k, v in m.items() if k not in head and k not in nested}
        parts.append(f"<h3>{html.escape(run.name)}</h3>{_kv(facts)}{_kv(nested)}{_kv(rest) if rest else ''}")
    return "\n".join(parts)


def page(title: str, body_sections: list[str], subtitle: str = "") -> str:
    """The whole document."""
    nav = " ".join(
        f'<a href="#{sid}">{html.escape(name.split(":")[0])}</a>' for sid, name in SECTIONS.items()
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>"
        f'<p class="muted">{html.escape(subtitle)}</p><nav>{nav}</nav>\n'
        + "\n".join(body_sections)
        + "\n</body></html>\n"
    )
