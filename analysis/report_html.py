"""The HTML pieces of the study page (``analysis.report``): style, the sort/filter script, and
escaped table builders. Everything inline: the page makes no network request."""
from __future__ import annotations

import html
import math

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 16px 40px;
color:#222}
h1{font-size:1.5em;margin:.8em 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .4em;
border-bottom:1px solid #ddd}
nav a{margin-right:1em}table{border-collapse:collapse;font-size:13px;margin:.4em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:13px;color:#444;max-width:900px}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px;white-space:pre-wrap}
.holds{color:#026b4e;font-weight:600}.nothold{color:#a33b00;font-weight:600}
.muted{color:#666}input[type=search]{width:22em;padding:3px}
"""

SCRIPT = """
function cellValue(tr, i){const c=tr.children[i];return c.dataset.v!==undefined?c.dataset.v:c.textContent.trim();}
function sortTable(th){
  const table=th.closest('table'), body=table.tBodies[0], i=[...th.parentNode.children].indexOf(th);
  const asc=th.getAttribute('aria-sort')!=='ascending';
  for(const h of th.parentNode.children) h.removeAttribute('aria-sort');
  th.setAttribute('aria-sort', asc?'ascending':'descending');
  const rows=[...body.rows], vals=rows.map(r=>cellValue(r,i));
  const numeric=vals.every(v=>v===''||!isNaN(Number(v)));
  const key=v=>numeric?(v===''?Infinity:Number(v)):v.toLowerCase();
  const idx=rows.map((r,k)=>k).sort((a,b)=>{const x=key(vals[a]),y=key(vals[b]);
    const c=x<y?-1:x>y?1:a-b;return asc?c:(x<y?1:x>y?-1:a-b);});
  for(const k of idx) body.appendChild(rows[k]);
}
function filterTable(input){
  const table=document.getElementById(input.dataset.table), q=input.value.toLowerCase();
  let shown=0;
  for(const r of table.tBodies[0].rows){const ok=r.textContent.toLowerCase().includes(q);
    r.hidden=!ok;shown+=ok;}
  document.getElementById(input.dataset.table+'-count').textContent=shown+' of '+
    table.tBodies[0].rows.length+' cells shown';
}
document.addEventListener('click',e=>{const th=e.target.closest('table.sortable th');if(th)sortTable(th);});
document.addEventListener('input',e=>{if(e.target.dataset.table)filterTable(e.target);});
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def num(x, digits: int = 4) -> str:
    """A number for a table cell: NaN/None as '', else ``digits`` significant digits."""
    if x is None:
        return ""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return esc(x)
    return "" if not math.isfinite(x) else f"{x:.{digits}g}"


def table(headers: list[str], rows: list[list], numeric: set | None = None, tid: str = "",
          sortable: bool = False) -> str:
    """An escaped HTML table; ``numeric``: column indices right-aligned, the raw value kept in
    ``data-v`` for sorting. Cells are plain values (escaped here)."""
    numeric = numeric or set()
    attrs = (f' id="{esc(tid)}"' if tid else "") + (' class="sortable"' if sortable else "")
    out = [f"<table{attrs}><thead><tr>"
           + "".join(f'<th scope="col" title="click to sort">{esc(h)}</th>' if sortable
                     else f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for r in rows:
        tds = []
        for i, v in enumerate(r):
            if i in numeric:
                raw = "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
                tds.append(f'<td class="num" data-v="{esc(raw)}">{num(v)}</td>')
            else:
                tds.append(f"<td>{esc(v)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def verdict_span(verdict: str) -> str:
    cls = "holds" if verdict == "holds" else "nothold" if verdict == "does not hold" else "muted"
    return f'<span class="{cls}">{esc(verdict)}</span>'


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
