"""One self-contained HTML page for people to look at, from one or many reports.

    write_html("run.html", reports, title=...)      # reports: per-model report dicts
    write_single("model.html", report, input, output)   # the single-model CLI's --html

The page is rendered here (the table and every detail view are plain HTML: it reads without
JavaScript); one small inline script sorts the table. Nothing is loaded from anywhere: no
URLs, no fonts, no external scripts or styles; a Content-Security-Policy meta tag
(`default-src 'none'`, the script allowed by its sha256) makes the browser refuse anything
else. Detail views are `:target` sections (`#m3`), so links to a model work.

Reports are read defensively: a missing or mistyped field renders as "–", never an error,
so reports of older or newer schemas (and synthesized error entries) render.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import os
from pathlib import Path

_DASH = "–"

_CSS = """
:root{--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--mut:#57606a;--line:#d0d7de;--bg2:#f6f8fa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:0 0 8px}h3{font-size:14px;margin:14px 0 6px}
.counts{color:var(--mut);margin:0 0 16px}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:var(--bg2);position:sticky;top:0}
th button{font:inherit;font-weight:600;border:0;background:none;cursor:pointer;padding:0;color:inherit}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
tbody tr:hover{background:#fafbfc}
.s{font-weight:600;white-space:nowrap}.s-ok,.s-passed{color:var(--ok)}.s-up_to_date{color:var(--mut)}
.s-validation_failed,.s-error,.s-internal_error,.s-failed{color:var(--bad)}.s-interrupted,.s-changed,.s-skipped{color:var(--warn)}
.detail{display:none;border:1px solid var(--line);border-radius:6px;padding:12px 16px;margin:16px 0;background:#fff}
.detail:target{display:block}
.err{color:var(--bad);white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px}
.mono{font-family:ui-monospace,monospace;font-size:12px}
ul.notes{margin:4px 0;padding-left:20px}ul.notes li{font-family:ui-monospace,monospace;font-size:12px}
.pass{border-left:3px solid var(--line);padding-left:10px;margin:10px 0}
svg.ops text{font:11px ui-monospace,monospace;fill:#1f2328}svg.ops .b{fill:#afb8c1}svg.ops .a{fill:#0969da}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
.lb{background:#afb8c1}.la{background:#0969da}
"""

# Sorts by the data-v of the clicked column: numbers numerically, text by locale, empty last.
_JS = """
(function(){
var table=document.getElementById('models');if(!table)return;
var heads=table.tHead.rows[0].cells;
function key(row,i,num){var v=row.cells[i].getAttribute('data-v');
if(v===null||v==='')return null;return num?parseFloat(v):v.toLowerCase();}
function sortBy(i){var th=heads[i],num=th.getAttribute('data-type')==='num';
var dir=th.getAttribute('aria-sort')==='ascending'?'descending':'ascending';
for(var k=0;k<heads.length;k++)heads[k].setAttribute('aria-sort','none');
th.setAttribute('aria-sort',dir);var s=dir==='ascending'?1:-1;
var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=key(a,i,num),y=key(b,i,num);
if(x===null&&y===null)return 0;if(x===null)return 1;if(y===null)return -1;
if(x<y)return -s;if(x>y)return s;return 0;});
rows.forEach(function(r){body.appendChild(r);});}
Array.prototype.forEach.call(heads,function(th,i){var b=th.querySelector('button');
if(b)b.addEventListener('click',function(){sortBy(i);});});
})();
"""


def _script_hash() -> str:
    return base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()


CSP = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{_script_hash()}'; img-src data:"


# ---- facts about model files -----------------------------------------------------------
def model_facts(path) -> dict:
    """Size on disk (external data included), node count and op counts of a model file
    (the graph only: external tensors are not read); what could be read, on a broken file."""
    facts: dict = {}
    try:
        import onnx

        from .model_io import external_files, has_external

        p = Path(path)
        facts["size"] = p.stat().st_size
        model = onnx.load(str(p), load_external_data=False)
        for data in external_files(p) if has_external(model) else ():
            if data.is_file():
                facts["size"] += data.stat().st_size
        ops: dict[str, int] = {}
        for n in model.graph.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            ops[key] = ops.get(key, 0) + 1
        facts.update(nodes=len(model.graph.node), ops=ops)
    except Exception:
        pass
    return facts


def write_single(path, report: dict, input=None, output=None, code: int | None = None) -> None:
    """The single-model CLI's --html: the report plus the facts of its files."""
    report = dict(report or {})
    zoo = dict(report.get("zoo") or {})
    zoo.setdefault("path", os.path.basename(str(input or report.get("input") or "model")))
    if input:
        facts = model_facts(input)
        zoo.setdefault("size_before", facts.get("size"))
        zoo.setdefault("ops_before", facts.get("ops"))
    if output and report.get("output"):
        facts = model_facts(output)
        zoo.setdefault("size_after", facts.get("size"))
        zoo.setdefault("ops_after", facts.get("ops"))
    if code is not None:
        from .zoo import STATUS

        zoo.setdefault("exit_code", code)
        zoo.setdefault("status", STATUS.get(code, "error"))
    report["zoo"] = zoo
    write_html(path, [report], title=f"onnx-normfix: {zoo['path']}")


def write_html(path, reports: list, title: str = "onnx-normfix report", summary: dict | None = None) -> None:
    from .zoo import write_text

    write_text(path, render(reports, title, summary))


# ---- reading reports defensively -------------------------------------------------------
def _d(value) -> dict:
    return value if isinstance(value, dict) else {}


def _l(value) -> list:
    return value if isinstance(value, list) else []


def _num(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    if isinstance(value, str):
        try:
            f = float(value)
            return f if math.isfinite(f) else None
        except ValueError:
            return None
    return None


def _status(report: dict) -> str:
    from .zoo import entry_status

    try:
        return str(entry_status(report))
    except Exception:
        return "error"


def _size(report: dict, when: str):
    z = _d(report.get("zoo"))
    side = _d(_d(report.get("files")).get("input" if when == "before" else "output"))
    for value in (z.get(f"size_{when}"), side.get("total_bytes"), side.get("bytes"),
                  report.get(f"size_{when}"), report.get(f"bytes_{when}"),
                  _d(report.get("sizes")).get(when), _d(report.get("size")).get(when),
                  _d(report.get("file_sizes")).get(when)):
        if _num(value) is not None:
            return _num(value)
    return None


def _passes(report: dict) -> list[dict]:
    return [p for p in _l(report.get("passes")) if isinstance(p, dict)]


def _validation(report: dict) -> tuple[float | None, str]:
    """The worst max abs diff over the stages compared, and what the checks covered."""
    worst, checks, skipped = None, [], []
    for p in _passes(report):
        v = _d(p.get("validation"))
        status = v.get("status")
        diff = _num(v.get("max_abs_diff"))
        if status in ("passed", "changed", "failed") and diff is not None:
            worst = diff if worst is None else max(worst, diff)
        for c in _l(v.get("checks")):
            if isinstance(c, str) and c not in checks:
                checks.append(c)
        if status == "skipped" and v.get("reason"):
            skipped.append(f"{p.get('name')}: {v.get('reason')}")
    covered = _d(report.get("validation")).get("summary")
    covered = covered if isinstance(covered, str) and covered else ", ".join(checks)
    for key in ("validation", "covered", "validated"):
        if isinstance(report.get(key), str):
            covered = covered or report[key]
        elif isinstance(_d(report.get(key)).get("covered"), str):
            covered = covered or report[key]["covered"]
    if not covered and skipped:
        covered = "not compared (" + "; ".join(skipped[:2]) + ")"
    failed = _failure_details(report)  # a validation failure: the figures that failed it
    if worst is None and _num(failed.get("max_abs_diff")) is not None:
        worst = _num(failed.get("max_abs_diff"))
    if _stage(report) and not covered:
        covered = f"failed at {_stage(report)}"
    return worst, covered


def _stage(report: dict):
    return report.get("stage") or _d(report.get("error")).get("stage")


def _failure_details(report: dict) -> dict:
    return _d(report.get("details")) or _d(_d(report.get("error")).get("details"))


def _error_text(report: dict):
    z = _d(report.get("zoo"))
    err = z.get("error") or report.get("error")
    if isinstance(err, dict):  # {kind, message, stage, details}
        err = err.get("message") or err.get("kind")
    return err


def _declines(entry: dict) -> tuple[list[str], list[str]]:
    """(notes, declines): structured `declines` if the pass gives them, else the notes that
    say a site was skipped or left."""
    notes = [str(n) for n in _l(entry.get("notes"))]
    declines = [str(d.get("reason") if isinstance(d, dict) and "site" not in d else
                    f"{d.get('site')}: {d.get('reason')}" if isinstance(d, dict) else d)
                for d in _l(entry.get("declines"))]
    if not declines:
        declines = [n for n in notes if n.startswith(("skipped ", "declined ", "left "))]
        notes = [n for n in notes if n not in declines]
    return notes, declines


# ---- rendering -------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt_bytes(n) -> str:
    n = _num(n)
    if n is None:
        return _DASH
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return _DASH


def _fmt_num(n, spec=".3g") -> str:
    n = _num(n)
    return _DASH if n is None else format(n, spec)


def _arrow(a, b, fmt) -> str:
    if a is None and b is None:
        return _DASH
    return f"{fmt(a)} → {fmt(b)}"


def _cell(text: str, value=None, cls: str = "") -> str:
    v = "" if value is None else _e(value)
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-v="{v}">{text}</td>'


def render(reports: list, title: str = "onnx-normfix report", summary: dict | None = None) -> str:
    reports = [r for r in (reports or []) if isinstance(r, dict)]
    rows, details = [], []
    for k, r in enumerate(reports):
        rows.append(_row(k, r))
        details.append(_detail(k, r))
    counts: dict[str, int] = {}
    for r in reports:
        counts[_status(r)] = counts.get(_status(r), 0) + 1
    count_text = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
    extra = ""
    if summary:
        secs = _num(summary.get("seconds"))
        if secs is not None:
            extra += f" in {secs:.1f} s"
        if _num(summary.get("jobs")):
            extra += f" with {int(summary['jobs'])} jobs"
        if summary.get("exit_code") is not None:
            extra += f"; exit code {_e(summary.get('exit_code'))}"
    heads = [("model", "str", ""), ("status", "str", ""), ("passes", "str", ""), ("rewrites", "num", "n"),
             ("nodes before", "num", "n"), ("nodes after", "num", "n"), ("size before", "num", "n"),
             ("size after", "num", "n"), ("max abs diff", "num", "n"), ("validation covered", "str", ""),
             ("seconds", "num", "n")]
    head_html = "".join(f'<th data-type="{t}" aria-sort="none" class="{c}"><button type="button">{_e(h)}</button></th>'
                        for h, t, c in heads)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{_e(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="counts">{len(reports)} model{'s' if len(reports) != 1 else ''}{_e(extra)}: {_e(count_text) or 'none'}. Click a model for its details; click a column to sort.</p>
<table id="models"><thead><tr>{head_html}</tr></thead>
<tbody>
{''.join(rows)}
</tbody></table>
{''.join(details)}
<script>{_JS}</script>
</body></html>
"""


def _name(r: dict, k: int) -> str:
    z = _d(r.get("zoo"))
    return str(z.get("path") or r.get("input") or f"model {k + 1}")


def _row(k: int, r: dict) -> str:
    z = _d(r.get("zoo"))
    status = _status(r)
    passes = _passes(r)
    names = (", ".join(str(p.get("name")) for p in passes) or (z.get("passes") if isinstance(z.get("passes"), str) else "")
             or _passes_from_options(z.get("options")))
    rewrites = sum(int(_num(p.get("rewrites")) or 0) for p in passes) if passes else None
    nb, na = _num(r.get("nodes_before")), _num(r.get("nodes_after"))
    sb, sa = _size(r, "before"), _size(r, "after")
    diff, covered = _validation(r)
    secs = _num(z.get("seconds"))
    secs = secs if secs is not None else _num(r.get("seconds"))
    code = z.get("exit_code")
    title = f' title="exit code {_e(code)}"' if code is not None else ""
    return ("<tr>" + _cell(f'<a href="#m{k}">{_e(_name(r, k))}</a>', _name(r, k))
            + f'<td class="s s-{_e(status)}" data-v="{_e(status)}"{title}>{_e(status.replace("_", " "))}</td>'
            + _cell(_e(names or _DASH), names)
            + _cell(_fmt_num(rewrites, "d") if rewrites is not None else _DASH, rewrites, "n")
            + _cell(_fmt_num(nb, ".0f"), nb, "n") + _cell(_fmt_num(na, ".0f"), na, "n")
            + _cell(_fmt_bytes(sb), sb, "n") + _cell(_fmt_bytes(sa), sa, "n")
            + _cell(_fmt_num(diff), diff, "n") + _cell(_e(covered or _DASH), covered)
            + _cell(_fmt_num(secs, ".2f"), secs, "n") + "</tr>\n")


def _passes_from_options(options) -> str:
    options = _l(options)
    for i, word in enumerate(options[:-1]):
        if word == "--passes":
            return str(options[i + 1])
    return ""


def _detail(k: int, r: dict) -> str:
    z = _d(r.get("zoo"))
    status = _status(r)
    parts = [f'<section class="detail" id="m{k}"><h2>{_e(_name(r, k))} '
             f'<span class="s s-{_e(status)}">{_e(status.replace("_", " "))}</span></h2>']
    facts = []
    for label, value in (("input", r.get("input")), ("output", r.get("output")),
                         ("exit code", z.get("exit_code")), ("report", z.get("report")),
                         ("options", " ".join(map(str, _l(z.get("options")))) or None),
                         ("input sha256", z.get("input_sha256")),
                         ("tool", z.get("tool_version") or _d(r.get("tool")).get("version") or r.get("version")),
                         ("validation", _d(r.get("validation")).get("summary"))):
        if value not in (None, ""):
            facts.append(f"<div><b>{_e(label)}:</b> <span class=\"mono\">{_e(value)}</span></div>")
    if z.get("up_to_date"):
        facts.append("<div>Up to date: same input bytes, options and tool version as the run this report is from; "
                     "not re-run.</div>")
    parts.append("".join(facts))
    error = _error_text(r)
    if error:
        parts.append(f'<h3>Error</h3><div class="err">{_e(error)}</div>')
    stderr = z.get("stderr")
    if stderr and status not in ("ok", "up_to_date"):
        parts.append(f'<details><summary>stderr</summary><div class="err">{_e(stderr)}</div></details>')
    if _stage(r) or _failure_details(r):
        parts.append(f"<div>failed at stage <b>{_e(_stage(r) or _DASH)}</b></div>")
        outs = _d(_failure_details(r).get("outputs"))
        if outs and not any(p.get("name") == _stage(r) and _d(_d(p.get("validation")).get("outputs"))
                            for p in _passes(r)):  # shown with the pass otherwise
            parts.append(_outputs_table(outs))
    for note in _l(r.get("notes")):
        parts.append(f'<div class="mono">{_e(note)}</div>')
    for p in _passes(r):
        parts.append(_pass_html(p))
    left = [x for x in _l(r.get("leftovers")) if isinstance(x, dict)]
    if left:
        parts.append("<h3>Left in the model</h3><ul class=\"notes\">" + "".join(
            f"<li>{_e(x.get('count', ''))} {_e(x.get('op', ''))} {_e(x.get('kind') or '')}: {_e(x.get('reason') or '')}"
            + (f" ({_e(x.get('hint'))})" if x.get("hint") else "") + "</li>" for x in left) + "</ul>")
    ref = _d(r.get("reference"))
    if ref:
        parts.append(f"<h3>Reference</h3><div>{_e(ref.get('status', _DASH))}, max abs diff "
                     f"{_fmt_num(ref.get('max_abs_diff'))}</div>")
        if _d(ref.get("outputs")):
            parts.append(_outputs_table(ref["outputs"]))
    ops_b, ops_a = _d(z.get("ops_before")), _d(z.get("ops_after"))
    if ops_b or ops_a:
        parts.append("<h3>Op counts</h3>" + _ops_chart(ops_b, ops_a))
    parts.append('<p><a href="#">close</a></p></section>\n')
    return "".join(parts)


def _pass_html(p: dict) -> str:
    v = _d(p.get("validation"))
    notes, declines = _declines(p)
    status = str(v.get("status") or _DASH)
    line = (f'<div class="pass"><h3>{_e(p.get("name", "pass"))}: {_fmt_num(p.get("rewrites"), ".0f")} rewrites, '
            f'nodes {_fmt_num(p.get("nodes_before"), ".0f")} → {_fmt_num(p.get("nodes_after"), ".0f")}, '
            f'{_fmt_num(p.get("seconds"), ".2f")} s</h3>'
            f'<div>validation <span class="s s-{_e(status)}">{_e(status)}</span>')
    if _num(v.get("max_abs_diff")) is not None and status != "skipped":
        line += f", max abs diff {_fmt_num(v.get('max_abs_diff'))}, max rel diff {_fmt_num(v.get('max_rel_diff'))}"
    checks = [str(c) for c in _l(v.get("checks"))]
    if checks:
        line += f"; covered: {_e(', '.join(checks))}"
    if v.get("reason"):
        line += f" ({_e(v.get('reason'))})"
    line += "</div>"
    if declines:
        line += f"<div><b>declined ({len(declines)}):</b></div><ul class=\"notes declines\">" + "".join(
            f"<li>{_e(d)}</li>" for d in declines) + "</ul>"
    if notes:
        line += "<div><b>notes:</b></div><ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    outs = _d(v.get("outputs"))
    if outs:
        line += _outputs_table(outs)
    return line + "</div>"


def _outputs_table(outputs: dict) -> str:
    rows = []
    for name, o in outputs.items():
        o = _d(o)
        ok = o.get("ok")
        mark = "ok" if ok is True else ("failed" if ok is False else _DASH)
        shape = o.get("shape")
        rows.append(f"<tr><td class=\"mono\">{_e(name)}</td><td class=\"s s-{'passed' if ok else 'failed'}\">{mark}</td>"
                    f"<td class=\"mono\">{_e(shape if shape is not None else _DASH)}</td><td>{_e(o.get('dtype', _DASH))}</td>"
                    f"<td class=\"n\">{_fmt_num(o.get('max_abs_diff'))}</td><td class=\"n\">{_fmt_num(o.get('max_rel_diff'))}</td>"
                    f"<td>{_e(o.get('reason') or '')}</td></tr>")
    return ("<table class=\"outputs\"><thead><tr><th>output</th><th>ok</th><th>shape</th><th>dtype</th>"
            "<th class=\"n\">max abs diff</th><th class=\"n\">max rel diff</th><th>reason</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _ops_chart(before: dict, after: dict, width: int = 420) -> str:
    """Inline SVG: per op type a grey bar (before) and a blue bar (after)."""
    ops = sorted(set(before) | set(after), key=lambda o: (-max(_num(before.get(o)) or 0, _num(after.get(o)) or 0), o))
    top = max([_num(v) or 0 for v in list(before.values()) + list(after.values())] + [1])
    label_w, bar_w, row_h = 150, width - 150 - 70, 18
    rows = []
    for i, op in enumerate(ops):
        b, a = int(_num(before.get(op)) or 0), int(_num(after.get(op)) or 0)
        y = i * row_h
        rows.append(f'<g data-op="{_e(op)}"><text x="0" y="{y + 12}">{_e(op[:22])}</text>'
                    f'<rect class="b" x="{label_w}" y="{y + 2}" width="{bar_w * b / top:.1f}" height="6"/>'
                    f'<rect class="a" x="{label_w}" y="{y + 9}" width="{bar_w * a / top:.1f}" height="6"/>'
                    f'<text x="{label_w + bar_w + 6}" y="{y + 12}">{b} → {a}</text></g>')
    height = max(row_h, len(ops) * row_h)
    return (f'<div class="legend"><span class="lb"></span>before<span class="la"></span>after</div>'
            f'<svg class="ops" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="op counts before and after">{"".join(rows)}</svg>')
