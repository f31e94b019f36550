"""shrink.report: tables, paper numbers, glue (shared API items 1-3)."""

import json
import re

import pytest

from shrink import report, results
from shrink.eval import Spread
from shrink.errors import ShrinkError


def test_fmt_number_significant_digits_and_edge_cases():
    assert report.fmt_number(19.13382) == "19.13"
    assert report.fmt_number(0.5, 3) == "0.500"
    assert report.fmt_number(1234.56) == "1235"
    assert report.fmt_number(0.0000123) == "1.230e-05"
    assert report.fmt_number(12345) == "12\u2009345" and report.fmt_number(999) == "999"
    assert report.fmt_number(float("nan")) == "—" and report.fmt_number(None) == "—"
    assert report.fmt_number(float("inf")) == "∞" and report.fmt_number(0.0) == "0"
    assert report.fmt_number(True) == "True" and report.fmt_number("abc") == "abc"


def test_spread_cells_show_the_std_with_one_or_two_digits():
    assert report.fmt_number(Spread([34.4, 34.0, 34.8])) == "34.4 ± 0.4 [34.0, 34.8], n=3 seeds"
    assert report.fmt_number(Spread([19.1, 19.3, 19.12])) == "19.17 ± 0.11 [19.10, 19.30], n=3 seeds"
    assert report.fmt_number(Spread([2.5], kind="seeds")) == "2.500 (n=1 seed)"


@pytest.mark.parametrize("shape", ["records", "rows", "frame"])
def test_table_shapes_render_html_with_every_cell(shape):
    import pandas as pd

    recs = [{"method": "wanda", "ppl": 19.13382, "seeds": 3}, {"method": "magnitude", "ppl": 3.1e5, "seeds": 1}]
    data = {"records": recs, "rows": {r["method"]: {"ppl": r["ppl"], "seeds": r["seeds"]} for r in recs},
            "frame": pd.DataFrame(recs)}[shape]
    t = report.table(data, caption="Perplexity <ppl>", index=None if shape != "records" else "method")
    h = t._repr_html_()
    assert h.startswith('<div class="shrink-table" style="overflow-x:auto')
    assert h.count("<tr>") == 3  # header + two rows
    for cell in ("wanda", "magnitude", "19.13", "310000", ">3<", ">1<"):
        assert cell in h, cell
    assert "Perplexity &lt;ppl&gt;" in h  # caption escaped
    # deterministic (nbval and the book compare executed notebooks)
    assert report.table(data, caption="Perplexity <ppl>", index=None if shape != "records" else "method"
                        )._repr_html_() == h
    md = t.to_markdown().splitlines()
    assert len(md) == 4 and md[2].startswith("| wanda | 19.13 | 3 |")


def test_table_index_hidden_for_plain_records():
    t = report.table([{"a": 1, "b": 2.0}])
    assert "row_heading" not in t._repr_html_()
    assert t.to_markdown().splitlines()[0] == "| a | b |"


@pytest.mark.parametrize("bad, match", [([], "empty list"), ({}, "empty dict"), ([1, 2], "not dicts"),
                                        ({"a": 1}, "not dicts"), (3.0, "cannot show")])
def test_table_bad_input_names_the_fix(bad, match):
    with pytest.raises(ShrinkError, match=match):
        report.table(bad)


def test_table_bad_index_and_digits():
    with pytest.raises(ShrinkError, match="no such column"):
        report.table([{"a": 1}], index="b")
    with pytest.raises(ShrinkError, match="significant digits"):
        report.table([{"a": 1}], digits=0)


def test_every_paper_numbers_file_is_valid():
    files = sorted(report.paper_numbers_dir().glob("*.yaml"))
    assert any(f.stem == "00-start" for f in files)
    for f in files:
        nums = report.paper(f.stem)
        assert nums, f
        for pid, e in nums.items():
            assert e["ref"].strip() and e["value"] not in ("", None), (f, pid)


def _with_yaml(monkeypatch, tmp_path, text):
    (tmp_path / "99-test.yaml").write_text(text)
    monkeypatch.setattr(report, "paper_numbers_dir", lambda: tmp_path)


@pytest.mark.parametrize("text, match", [
    ("a: {value: 1.0}\n", r"lacks \['ref'\]"),
    ("a: {value: 1.0, ref: T1, page: 3}\n", "unknown keys"),
    ("a: 5\n", "must be a mapping"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("a: {value: [1, 2], ref: T1}\n", "number or a string"),
    ("a: {value: 1, ref: ''}\n", "ref must name"),
    ("a: {value: 1, ref: T1\n", "not valid YAML"),
])
def test_malformed_paper_file_names_the_file(monkeypatch, tmp_path, text, match):
    _with_yaml(monkeypatch, tmp_path, text)
    with pytest.raises(ShrinkError, match=match) as exc:
        report.paper("99-test")
    assert "99-test.yaml" in str(exc.value)


def test_missing_chapter_file():
    with pytest.raises(ShrinkError, match=r"99-nope.yaml does not exist"):
        report.paper("99-nope")


def test_paper_vs_ours_generates_the_table(monkeypatch, tmp_path):
    _with_yaml(monkeypatch, tmp_path, 'ppl: {value: 5.47, ref: "Table 1", paper: "Son et al.", model: "LLaMA-2-7B"}\n'
                                      'big: {value: 9250.33, ref: "Table 1"}\n'
                                      'txt: {value: "≈ 2.6·10³", ref: "Fig. 1"}\n')
    t = report.paper_vs_ours("99-test", [
        {"quantity": "dense ppl", "paper": "ppl", "ours": 19.13382, "why": "smaller model"},
        {"quantity": "two", "paper": ["big", "txt"], "ours": Spread([1.0, 1.2]), "why": "w"},
        {"quantity": "ours only", "paper": None, "ours": "see above", "why": "-"},
    ])
    rows = t.frame.to_dict("records")
    assert rows[0]["paper"] == "5.47"  # as the paper prints it, not re-rounded
    assert rows[0]["paper's setting (reference)"] == "Son et al., Table 1: LLaMA-2-7B"
    assert rows[0]["ours"] == "19.13"
    assert rows[1]["paper"] == "9250.33 / ≈ 2.6·10³" and rows[1]["paper's setting (reference)"] == "Table 1; Fig. 1"
    assert rows[1]["ours"].startswith("1.10 ± 0.14")
    assert rows[2]["paper"] == "—"
    assert "Paper vs ours" in t._repr_html_()


@pytest.mark.parametrize("row, match", [
    ({"quantity": "q", "paper": "nope", "ours": 1, "why": ""}, r"unknown paper-number ids \['nope'\].*99-test.yaml"),
    ({"quantity": "q", "paper": 3, "ours": 1, "why": ""}, "must be an id"),
    ({"quantity": "q", "ours": 1}, "lacks"),
    ({"quantity": "q", "ours": 1, "why": "", "paper_value": 2}, "unknown keys"),
])
def test_paper_vs_ours_bad_rows(monkeypatch, tmp_path, row, match):
    _with_yaml(monkeypatch, tmp_path, 'ppl: {value: 5.47, ref: "Table 1"}\n')
    with pytest.raises(ShrinkError, match=match):
        report.paper_vs_ours("99-test", [row])


def test_glue_stores_the_formatted_text(monkeypatch):
    seen = {}

    def fake_glue(name, obj, display=True):
        import IPython

        bundle, _ = IPython.core.formatters.format_display_data(obj)
        seen[name] = (bundle["text/plain"], display)

    import myst_nb

    monkeypatch.setattr(myst_nb, "glue", fake_glue)
    assert report.glue("ppl", 19.13382, ".2f") is None  # nothing displayed, even as a cell's last line
    assert seen["ppl"] == ("19.13", False)  # no quotes: {glue:text} pastes text/plain as it is
    for name, value, fmt, text in [("frac", 0.1234, ".1%", "12.3%"), ("dflt", 19.13382, None, "19.13"),
                                   ("sp", Spread([34.4, 34.0, 34.8]), None, "34.4 ± 0.4 [34.0, 34.8], n=3 seeds"),
                                   ("sp2", Spread([34.4, 34.0, 34.8]), "2", "34.40 ± 0.40 [34.00, 34.80], n=3 seeds"),
                                   ("s", "none", None, "none")]:
        report.glue(name, value, fmt)
        assert seen[name][0] == text == report.glue_text(value, fmt), name
    with pytest.raises(ShrinkError, match="letters, digits"):
        report.glue("bad name", 1.0)
    with pytest.raises(ShrinkError, match=r"glue\('x'\): format spec"):
        report.glue("x", 1.0, "d")


def test_results_page_lists_machine_and_records_of_other_code(tmp_path, monkeypatch):
    results.save("dense-ppl", {"a": 1}, {"ppl": 19.13382, "n": 8}, scale="tiny", chapter="00-start")
    p = results.save("old", {"a": 2}, {"ppl": 20.0}, scale="tiny", chapter="00-start")
    rec = json.loads(p.read_text())
    rec["code"] = "deadbeef0000"
    p.write_text(json.dumps(rec))
    page = report.render("tiny")
    assert "**1 record made by other code** and reused: `deadbeef0000` (1 record): `old-" in page
    assert re.search(r"\| dense-ppl \| `\w{16}` \| n=8, ppl=19.13 \| [^|]*torch [^|]+ \| current \|", page), page
    assert "other: deadbeef0000" in page
    assert "/work/" not in page and str(tmp_path) not in page


def test_stage_notebook_hides_injected_parameters_and_machine_paths(tmp_path, monkeypatch):
    import nbformat

    from shrink import env

    data = tmp_path / "somewhere" / "data"
    monkeypatch.setenv("SHRINK_DATA", str(data))
    root = str(env.repo_root())
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('scale = "cpu"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('# Parameters\nscale = "tiny"', metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("print(1)", outputs=[nbformat.v4.new_output(
                    "stream", name="stderr", text=f"{root}/.venv/lib/x.py:3: Warning\nreading {data}/MANIFEST.md\n")])]
    nb.metadata["papermill"] = {"input_path": f"{root}/notebooks/x.md", "output_path": f"{root}/build/x.ipynb"}
    src = tmp_path / "exec" / "00-start" / "x.ipynb"
    src.parent.mkdir(parents=True)
    nbformat.write(nb, src)
    (src.parent / "y.failed.ipynb").write_text("{}")
    (src.parent / ".x.ipynb.partial").write_text("{}")
    staged = report.stage_notebooks(tmp_path / "exec", tmp_path / "book" / "notebooks")
    assert [p.relative_to(tmp_path / "book").as_posix() for p in staged] == ["notebooks/00-start/x.ipynb"]
    out = nbformat.read(staged[0], as_version=4)
    assert out.cells[0].metadata.tags == ["parameters"]
    assert out.cells[1].metadata.tags == ["injected-parameters", "remove-cell"]
    text = staged[0].read_text()
    assert root not in text and str(data) not in text
    assert "<repo>/.venv/lib/x.py" in text and "$SHRINK_DATA/MANIFEST.md" in text
    assert out.metadata.papermill.input_path == "<repo>/notebooks/x.md"
    with pytest.raises(ShrinkError, match="execute the notebooks first"):
        report.stage_notebooks(tmp_path / "nope", tmp_path / "book")


def test_book_serves_its_own_mathjax():
    import yaml

    from shrink import env

    root = env.repo_root()
    cfg = yaml.safe_load((root / "book" / "_config.yml").read_text())
    sphinx = cfg["sphinx"]["config"]
    assert "://" not in sphinx["mathjax_path"] and sphinx["mathjax_path"].endswith("tex-mml-chtml.js")
    assert sphinx["html_extra_path"] == ["_mathjax"]
    make = (root / "Makefile").read_text()
    assert "mathjax@$(MATHJAX_VERSION)" in make and "build/book/_mathjax/mathjax/" in make
