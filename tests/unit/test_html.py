"""report.html: report.md rendered by markdown-it-py into one page that references nothing outside itself."""

from __future__ import annotations

import base64
import re

from lora_search.report.html_page import markdown_to_html

# a 1x1 PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
                       "rkJggg==")


def external_references(page: str) -> list[str]:
    """Every src or href in the page that is not a data: URI or a relative path."""
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    return [r for r in refs if re.match(r"^(?:[a-z][a-z0-9+.-]*:|//)", r, re.I) and not r.startswith("data:image/")]


def test_a_pipe_table_becomes_an_html_table_with_header_cells(tmp_path):
    md = ("| # | learning_rate | reason |\n|---|---|---|\n| 3 | `1e-4` | **pruned** at step 20 |\n"
          "| 4 | 0.0002 | a / b |\n")
    page = markdown_to_html(md, tmp_path)
    assert "<table>" in page and "<th>#</th>" in page and "<th>learning_rate</th>" in page
    assert "<td><code>1e-4</code></td>" in page and "<td><strong>pruned</strong> at step 20</td>" in page
    assert page.count("<tr>") == 3 and "<td>a / b</td>" in page


def test_a_report_image_is_inlined_with_its_caption_below(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "history.png").write_bytes(PNG)
    md = "## History\n\n![Optimization history](plots/history.png)\n*Best value so far.*\n"
    page = markdown_to_html(md, tmp_path)
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert f'<figure><img src="{uri}" alt="Optimization history"></figure>' in page
    assert "<p><em>Best value so far.</em></p>" in page and "<h2>History</h2>" in page
    assert "plots/history.png" not in page and external_references(page) == []


def test_missing_and_external_images_become_placeholders_never_references(tmp_path):
    md = ("![Missing plot](plots/none.png)\n*caption*\n\n![Remote](https://example.com/a.png)\n\n"
          "inline ![r](http://example.com/b.png) and ![p](//example.com/c.png) and ![f](file:///etc/hostname)\n\n"
          "[a link](https://example.com/x) and <https://example.com/y> stay text\n")
    page = markdown_to_html(md, tmp_path)
    assert '<p class="caption">[Missing plot: image not available]</p>' in page
    assert '<p class="caption">[Remote: image not available]</p>' in page
    assert "<img" not in page and 'src="http' not in page and "href=" not in page
    assert external_references(page) == [] and "a link and https://example.com/y stay text" in page


def test_raw_html_in_the_markdown_is_escaped_and_the_title_too(tmp_path):
    md = ("# Study <b>x</b>\n\nA trial reason: <script>alert(1)</script> <img src=http://example.com/t.png>\n\n"
          "| # | reason |\n|---|---|\n| 1 | <script>fetch('x')</script> |\n")
    page = markdown_to_html(md, tmp_path, title="<rank_lr> & co")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td>&lt;script&gt;fetch('x')&lt;/script&gt;</td>" in page
    assert "<title>&lt;rank_lr&gt; &amp; co</title>" in page and "<h1>Study &lt;b&gt;x&lt;/b&gt;</h1>" in page
    assert "<img" not in page and external_references(page) == []


def test_a_whole_report_renders_as_one_self_contained_page(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "importances.png").write_bytes(PNG)
    md = "\n".join([
        "# LoRA sweep `rank_lr`", "", "**What mattered.** Learning rate explains *71%* of the variance.", "",
        "## Trials (2: 1 complete, 1 pruned)", "", "| # | state | r | eval_loss | reason |", "|---|---|---|---|---|",
        "| 0 | COMPLETE | 8 | 1.234 |  |", "| 1 | PRUNED | 16 |  | diverged: loss nan / inf |", "",
        "![Parameter importances](plots/importances.png)", "*Share of the variance.*", "",
        "![History](plots/history.png)", "*Not drawn.*", "",
    ])
    page = markdown_to_html(md, tmp_path, title="LoRA sweep rank_lr")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>") and "<style>" in page
    assert page.count("<table>") == 1 and page.count("<tr>") == 3 and "<td>diverged: loss nan / inf</td>" in page
    assert "<h1>LoRA sweep <code>rank_lr</code></h1>" in page and "<em>71%</em>" in page
    assert page.count('src="data:image/png;base64,') == 1 and "[History: image not available]" in page
    assert "<link" not in page and "<script" not in page and external_references(page) == []
