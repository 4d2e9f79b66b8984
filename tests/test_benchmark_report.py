"""benchmarks.report: speed-ups against the right baseline, Markdown and PNG output."""
import json

import pytest

from benchmarks import report


def _bench(group, path, median, **extra):
    return {"group": group, "name": f"test_{path}", "fullname": f"x::{path}",
            "extra_info": {"path": path, "device": "cpu", **extra},
            "stats": {"median": median, "min": median * 0.9, "mean": median, "rounds": 5}}


@pytest.fixture
def results(tmp_path):
    data = {"machine_info": {"node": "box", "cpu": {"brand_raw": "Some CPU"}},
            "benchmarks": [
                _bench("loss", "dino_fast eager", 0.02, **{"GB/s": 5.0}),
                _bench("loss", "official double loop", 0.08),
                _bench("ema", "foreach", 0.01),
                _bench("ema", "per-parameter loop", 0.05, peak_memory_MB=1.5),
            ]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_speedups_are_relative_to_the_official_or_loop_baseline(results):
    _, rows = report.load_rows(results)
    groups = report.group_rows(rows)
    loss = {r["path"]: r for r in groups["loss"]}
    assert loss["dino_fast eager"]["speedup"] == pytest.approx(4.0)
    assert loss["official double loop"]["baseline"]
    ema = {r["path"]: r for r in groups["ema"]}
    assert ema["foreach"]["speedup"] == pytest.approx(5.0)


def test_markdown_and_png_are_written(results, tmp_path):
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert report.main([str(results), "--markdown", str(md), "--chart", str(png)]) == 0
    text = md.read_text()
    assert "| dino_fast eager | 20.000 | 18.000 | 4.00x | 5.0 |" in text
    assert "official double loop (baseline)" in text and "Some CPU" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_benchmark_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        report.load_rows(bad)
