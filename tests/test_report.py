"""The evaluation report is one document rendered twice: Markdown and HTML say the same things."""

from __future__ import annotations

from prouigan_platform.evaluation import html_page, markdown

DOC = [("title", "Evaluation: m<1>"), ("text", "Dataset `d.json`, split **test**: 3 of 3 faces."),
       ("table", ["method", "psnr ↑"], [["bicubic", "15.30"], ["model", "20.34"]]),
       ("image", "cases.png"), ("list", ["parse_f1: not measured — no <parser>"])]


def test_markdown_and_html_hold_the_same_report():
    md, page = markdown(DOC), html_page("m<1>", DOC)
    assert md.startswith("# Evaluation: m<1>\n") and "| bicubic | 15.30 |" in md and "![cases](cases.png)" in md
    assert "- parse_f1: not measured — no <parser>" in md
    assert "<td>bicubic</td><td>15.30</td>" in page and "<img src='cases.png'" in page
    assert "<code>d.json</code>" in page and "<b>test</b>" in page
    assert "m&lt;1&gt;" in page and "no &lt;parser&gt;" in page and "<parser>" not in page  # escaped, not markup
