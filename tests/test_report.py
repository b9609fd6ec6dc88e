"""The report: PNG plots exist and are non-empty, HTML and Markdown reference them, text is escaped."""

import re

from nashalign.eval.report import write_report


def _series():
    return {
        "inpo": [
            {"iteration": 0, "duality_gap": 0.30, "win_rate": 0.5, "mean_length": 3.0},
            {"iteration": 1, "duality_gap": 0.10, "win_rate": 0.6, "mean_length": 3.5},
        ],
        "iterative-dpo": [
            {"iteration": 0, "duality_gap": 0.30, "win_rate": 0.5, "mean_length": 3.0},
            {"iteration": 1, "duality_gap": 0.25, "win_rate": 0.55, "mean_length": 4.0},
        ],
    }


def test_report_writes_plots_referenced_by_html(tmp_path):
    paths = write_report(
        tmp_path,
        title="demo <run>",
        series=_series(),
        loss_curves={"inpo": [(1, 2.0), (2, 1.5), (3, 1.2)]},
        samples=[{"algorithm": "inpo", "iteration": 1, "prompt": "a|b", "response": "<script>x</script>"}],
    )
    names = {p.name for p in paths.plots}
    assert names == {"duality_gap.png", "win_rate.png", "mean_length.png", "training_loss.png"}
    for plot in paths.plots:
        data = plot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    page = paths.html.read_text()
    referenced = set(re.findall(r'<img src="([^"]+)"', page))
    assert referenced == names
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page
    assert "demo &lt;run&gt;" in page
    md = paths.markdown.read_text()
    assert all(f"]({n})" in md for n in names)
    assert "a\\|b" in md  # pipes inside cells do not break the Markdown table
    # Every metric value of every row is in the table.
    assert "0.25" in md and "iterative-dpo" in md


def test_metrics_absent_everywhere_are_not_plotted(tmp_path):
    paths = write_report(tmp_path, title="t", series={"a": [{"iteration": 0, "loss": 1.0}]})
    assert paths.plots == ()
    assert "(no plottable metrics)" in paths.html.read_text()
