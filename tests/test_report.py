"""The report renders the same tables and images to Markdown and HTML."""

from sendvae.eval.report import Report, format_value


def test_report_renders_markdown_and_html(tmp_path):
    report = Report("Demo <study>")
    report.heading("Probe")
    report.paragraph("Macro-F1 & accuracy.")
    report.table(["variant", "macro-F1", "PSNR"], [["none", 0.56912, 28.5], ["sendvae", float("nan"), None]])
    report.image("plots/probe.png", "probe per factor")
    md_path, html_path = report.write(tmp_path / "report")
    md, page = md_path.read_text(), html_path.read_text()
    assert "| variant | macro-F1 | PSNR |" in md and "| none | 0.5691 | 28.5 |" in md
    assert "| sendvae | – | – |" in md and "![probe per factor](plots/probe.png)" in md
    assert "<title>Demo &lt;study&gt;</title>" in page and "<td>0.5691</td>" in page
    assert "Macro-F1 &amp; accuracy." in page and "src='plots/probe.png'" in page


def test_format_value():
    assert format_value(3) == "3" and format_value(True) == "yes"
    assert format_value(0.000123) == "1.23e-04" and format_value(27.8412) == "27.84"
