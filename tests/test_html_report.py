"""The HTML page: self-contained, robust to any report shape, and working in a real browser.

The browser test renders the page in headless Chromium (`chromium --headless --dump-dom`): a
self-test script injected into a copy of the page clicks the column headers and a model
link, and writes what it saw into the DOM, which Chromium dumps. The page's own
Content-Security-Policy (`default-src 'none'`) plus the test's listener for policy
violations and the Resource Timing entries prove nothing was fetched; a twin page with an
external image proves that check fires.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from onnx_normfix import html_report, zoo
from onnx_normfix.html_report import CSP, render

from conftest import FIXTURES, conv_bn_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# the flags this sandboxed CI needs; a fresh profile per run
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND"]


def _reports(tmp_path) -> list[dict]:
    """Real per-model reports (the CLI run in-process through the zoo's worker function):
    an ok fold on a PyTorch export, a validation failure against a wrong reference, a
    broken file, and one up-to-date entry."""
    models = tmp_path / "in"
    models.mkdir()
    shutil.copy(FIXTURES / "resnet_tiny_bn.onnx", models / "resnet_tiny_bn.onnx")
    onnx.save(conv_bn_model(channels=6), models / "conv<b>&bn.onnx")
    (models / "broken.onnx").write_bytes(b"not a model")
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    np.savez(tmp_path / "inputs.npz", **feeds)
    np.savez(tmp_path / "wrong.npz", y=np.zeros((1, 6, 8, 8), np.float32))
    argv = {"conv<b>&bn.onnx": ["--passes", "fold_bn", "--inputs", str(tmp_path / "inputs.npz"),
                                "--reference", str(tmp_path / "wrong.npz")]}
    reports = []
    for name in ("resnet_tiny_bn.onnx", "conv<b>&bn.onnx", "broken.onnx"):
        task = {"path": name, "input": str(models / name), "output": str(tmp_path / "out" / name),
                "report": str(tmp_path / "reports" / (name + ".json")), "argv": argv.get(name, ["--passes", "fold_bn"]),
                "passes": "fold_bn"}
        reports.append(zoo.run_model(task))
    up = json.loads(json.dumps(reports[0]))
    up["zoo"].update(path="again/resnet_tiny_bn.onnx", up_to_date=True, seconds=0.5)
    reports.append(up)
    return reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return _reports(tmp_path_factory.mktemp("html"))


def test_reports_are_real(reports):
    ok, failed, broken, _ = reports
    assert ok["zoo"]["exit_code"] == 0 and ok["passes"][0]["rewrites"] == 6
    assert failed["zoo"]["exit_code"] == 1 and "reference" in failed["zoo"]["error"]
    assert broken["zoo"]["exit_code"] == 2 and "not a valid ONNX" in broken["zoo"]["error"]


def test_page_is_self_contained(reports):
    page = render(reports, title="zoo")
    assert not re.search(r"https?:", page), re.findall(r".{30}https?:.{30}", page)
    assert not re.search(r"\b(src|srcset|action|formaction|poster|data)\s*=", page, re.I)
    assert not re.search(r"@import|url\(|@font-face", page)
    assert set(re.findall(r'href="([^"]*)"', page)) <= {"#"} | {f"#m{k}" for k in range(len(reports))}
    assert f'content="{CSP}"' in page and "default-src 'none'" in CSP
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in CSP  # the browser runs exactly this script, nothing else


def test_names_and_messages_are_escaped(reports):
    page = render(reports)
    assert "conv<b>&bn.onnx" not in page and "conv&lt;b&gt;&amp;bn.onnx" in page
    evil = {"input": "<script>alert(1)</script>", "error": "</section><img src=x onerror=alert(1)>",
            "zoo": {"path": "\"><script>x</script>", "exit_code": 2}}
    page = render([evil])
    assert page.count("<script>") == 1 and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


@pytest.mark.parametrize("report", [
    {}, {"passes": "fold_bn"}, {"passes": [None, 3, {"validation": None, "notes": None}]},
    {"passes": [{"name": "fold_bn", "rewrites": "7", "validation": {"status": "passed", "max_abs_diff": "Infinity",
                                                                 "outputs": {"y": None}, "checks": "x"}}]},
    {"zoo": {"ops_before": {"Conv": "3"}, "ops_after": None, "seconds": "n/a", "exit_code": "2"}},
    {"zoo": None, "nodes_before": [1], "size": {"before": 10}, "details": {"outputs": {"y": {"ok": False}}}},
    {"status": "validation_failed", "version": "0.2", "sizes": {"before": 100, "after": 50}},
    {"error": {"kind": "validation", "message": "pass fold_bn changed output 'y'", "stage": "fold_bn",
               "details": {"outputs": {"y": {"ok": False, "max_abs_diff": 2.0}}}}, "files": {"input": {"total_bytes": 9}},
     "validation": {"summary": "whole model at x:2x3x8x8 (seed 0) after fold_bn"}, "tool": {"version": "0.1.0"},
     "leftovers": [{"op": "BatchNormalization", "count": 2, "reason": "over N*C", "hint": "run with fix_inorm"}, 7]},
    {"error": {"kind": None}, "files": [], "validation": "x", "leftovers": "y", "tool": 3},
], ids=["empty", "passes-str", "junk-entries", "strings-for-numbers", "bad-zoo", "odd-types", "sizes-key",
        "report-schema-1", "report-schema-1-junk"])
def test_any_report_shape_renders(report):
    page = render([report, None, "x"])
    assert page.count('<section class="detail"') == 1


def test_report_schema_1_fields_are_shown():
    """The CLI's report schema 1 (status, error object, files, validation summary, leftovers)."""
    report = {"status": "validation_failed", "exit_code": 1, "input": "m.onnx",
              "error": {"kind": "validation", "message": "pass fold_bn changed output 'y'", "stage": "fold_bn",
                        "details": {"max_abs_diff": 2.5, "outputs": {"y": {"ok": False, "max_abs_diff": 2.5}}}},
              "files": {"input": {"total_bytes": 2048}}, "validation": {"summary": "whole model at x:2x3x8x8"},
              "leftovers": [{"op": "BatchNormalization", "count": 2, "kind": "over N*C", "reason": "not after a Conv",
                             "hint": "run with fix_inorm"}]}
    page = render([report])
    assert "s-validation_failed" in page and "changed output &#x27;y&#x27;" in page and "2.0 KB" in page
    assert "whole model at x:2x3x8x8" in page and "failed at stage <b>fold_bn</b>" in page and "2.5" in page
    assert "run with fix_inorm" in page


def test_single_model_cli_html(tmp_path):
    from onnx_normfix import cli

    src, out, page = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "m.html"
    onnx.save(conv_bn_model(), src)
    assert cli.main([str(src), str(out), "--passes", "fold_bn", "-q", "--html", str(page)]) == 0
    text = page.read_text()
    assert "m.onnx" in text and "fold_bn" in text and 'data-op="BatchNormalization"' in text
    assert "1 → 0" in text  # the BN bar: one before, none after


def test_single_model_cli_html_on_a_validation_failure(tmp_path):
    from onnx_normfix import cli

    src, out, page = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "m.html"
    onnx.save(conv_bn_model(), src)
    np.savez(tmp_path / "x.npz", x=np.ones((1, 3, 8, 8), np.float32))
    np.savez(tmp_path / "y.npz", y=np.zeros((1, 4, 8, 8), np.float32))
    assert cli.main([str(src), str(out), "-q", "--inputs", str(tmp_path / "x.npz"), "--reference",
                     str(tmp_path / "y.npz"), "--html", str(page)]) == 1
    text = page.read_text()
    assert "s-validation_failed" in text and "differs from the reference" in text and not out.exists()


def _browser(page_html: str, tmp_path, name: str) -> dict:
    """Load `page_html` (plus the self-test) from file:// in headless Chromium; return what
    the self-test saw."""
    test_js = _SELFTEST_JS
    digest = base64.b64encode(hashlib.sha256(test_js.encode()).digest()).decode()
    page_html = page_html.replace("script-src ", f"script-src 'sha256-{digest}' ", 1)
    head_end = page_html.index("<title>")
    page_html = page_html[:head_end] + f"<script>{test_js}</script>" + page_html[head_end:]
    path = tmp_path / f"{name}.html"
    path.write_text(page_html)
    profile = tmp_path / f"profile-{name}"
    profile.mkdir()
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="selftest">(.*?)</pre>', proc.stdout, re.S)
    assert found, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    import html as html_mod

    return json.loads(html_mod.unescape(found.group(1)))


_SELFTEST_JS = r"""
var SELF={violations:[],errors:[]};
document.addEventListener('securitypolicyviolation',function(e){SELF.violations.push(e.blockedURI+' '+e.violatedDirective);});
window.addEventListener('error',function(e){SELF.errors.push(String(e.message));});
window.addEventListener('load',function(){
var R=SELF;
try{
var t=document.getElementById('models'),cells=t.tHead.rows[0].cells;
function col(i){return Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[i].getAttribute('data-v');});}
R.heads=Array.prototype.map.call(cells,function(c){return c.textContent.trim();});
R.rows=t.tBodies[0].rows.length;
var si=R.heads.indexOf('seconds'),mi=R.heads.indexOf('model'),st=R.heads.indexOf('status');
R.initial=col(mi);
cells[si].querySelector('button').click();R.sec_asc=col(si);R.sec_asc_names=col(mi);R.aria1=cells[si].getAttribute('aria-sort');
cells[si].querySelector('button').click();R.sec_desc=col(si);R.aria2=cells[si].getAttribute('aria-sort');
cells[mi].querySelector('button').click();R.model_asc=col(mi);R.aria_other=cells[si].getAttribute('aria-sort');
cells[st].querySelector('button').click();R.status_asc=col(st);
R.details_shown_before=Array.prototype.filter.call(document.querySelectorAll('.detail'),function(s){return getComputedStyle(s).display!=='none';}).length;
var link=Array.prototype.find.call(document.querySelectorAll('#models a'),function(a){return a.textContent==='conv<b>&bn.onnx';});
var sec=document.getElementById(link.getAttribute('href').slice(1));
link.click();
R.detail_display=getComputedStyle(sec).display;
R.detail_text=sec.innerText;
R.details_shown=Array.prototype.filter.call(document.querySelectorAll('.detail'),function(s){return getComputedStyle(s).display!=='none';}).length;
var okLink=Array.prototype.find.call(document.querySelectorAll('#models a'),function(a){return a.textContent==='resnet_tiny_bn.onnx';});
okLink.click();
var okSec=document.getElementById(okLink.getAttribute('href').slice(1));
R.ok_display=getComputedStyle(okSec).display;R.failed_display_after=getComputedStyle(sec).display;
R.ok_bars=okSec.querySelectorAll('svg.ops rect').length;R.ok_ops=Array.prototype.map.call(okSec.querySelectorAll('svg.ops g'),function(g){return g.getAttribute('data-op');});
R.bar_widths=Array.prototype.map.call(okSec.querySelectorAll('svg.ops g[data-op="BatchNormalization"] rect'),function(r){return r.getBoundingClientRect().width;});
R.ok_text=okSec.innerText;
R.table_height=t.getBoundingClientRect().height;
}catch(e){R.exception=String(e&&e.stack||e);}
R.resources=performance.getEntriesByType('resource').map(function(e){return e.name;});
var pre=document.createElement('pre');pre.id='selftest';pre.textContent=JSON.stringify(R);document.body.appendChild(pre);
});
"""

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium); "
                                    ".ci/run installs it")


def _sorted_numeric(values, reverse=False):
    nums = [float(v) for v in values if v not in (None, "")]
    return sorted(nums, reverse=reverse)


@needs_chromium
def test_page_in_headless_chromium(reports, tmp_path):
    seen = _browser(render(reports, title="zoo run"), tmp_path, "page")
    assert "exception" not in seen, seen["exception"]
    assert seen["errors"] == [] and seen["violations"] == [] and seen["resources"] == [], seen
    assert seen["rows"] == 4 and seen["table_height"] > 50
    for head in ("model", "status", "passes", "rewrites", "nodes before", "nodes after", "size before", "size after",
                 "max abs diff", "validation covered", "seconds"):
        assert head in seen["heads"]
    # sorting: numbers numerically (empty last), both directions, text alphabetically
    secs = [v for v in seen["sec_asc"] if v]
    assert [float(v) for v in secs] == _sorted_numeric(secs) and seen["aria1"] == "ascending"
    assert [float(v) for v in seen["sec_desc"] if v] == _sorted_numeric(secs, reverse=True) and seen["aria2"] == "descending"
    assert seen["sec_asc"] != seen["sec_desc"]
    assert seen["model_asc"] == sorted(seen["initial"], key=str.lower) and seen["aria_other"] == "none"
    assert seen["status_asc"] == sorted(seen["status_asc"])
    # the detail views: hidden until their model is clicked, one at a time
    assert seen["details_shown_before"] == 0
    assert seen["detail_display"] == "block" and seen["details_shown"] == 1
    assert "validation failed" in seen["detail_text"] and "reference" in seen["detail_text"]
    assert seen["ok_display"] == "block" and seen["failed_display_after"] == "none"
    assert "fold_bn: 6 rewrites" in seen["ok_text"] and "covered: checker, whole model" in seen["ok_text"]
    assert "BatchNormalization" in seen["ok_ops"] and seen["ok_bars"] == 2 * len(seen["ok_ops"])
    before, after = seen["bar_widths"]
    assert before > 0 and after == 0  # every BN folded: the after-bar is empty


@needs_chromium
def test_browser_check_catches_an_outside_load(reports, tmp_path):
    """The twin: a page that tries to fetch must be caught by the same check."""
    page = render(reports).replace("</body>", '<img src="http://127.0.0.1:9/pixel.png" alt="">'
                                   '<link rel="stylesheet" href="file:///etc/hostname"></body>')
    seen = _browser(page, tmp_path, "leaky")
    blocked = " ".join(seen["violations"] + seen["resources"])
    assert "127.0.0.1:9/pixel.png" in blocked and "/etc/hostname" in blocked, seen


def test_write_html_mode_follows_umask(reports, tmp_path):
    import os

    page = tmp_path / "p.html"
    old = os.umask(0o022)
    try:
        html_report.write_html(page, reports)
    finally:
        os.umask(old)
    assert page.stat().st_mode & 0o777 == 0o644
