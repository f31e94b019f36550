"""The notebook banner carries no machine path (published outputs must not)."""

from shrink import notebook


def test_banner_names_the_variable_not_the_path(tmp_path, monkeypatch, capsys):
    data = tmp_path / "secret-place" / "data"
    data.mkdir(parents=True)
    monkeypatch.setenv("SHRINK_DATA", str(data))
    assert notebook.data_status() == "$SHRINK_DATA (no MANIFEST.md)"
    (data / "MANIFEST.md").write_text("x")
    banner = notebook.setup(seed=0, scale="tiny")
    out = capsys.readouterr().out
    assert banner["data"] == "$SHRINK_DATA (ok)" and "data=$SHRINK_DATA (ok)" in out
    assert str(tmp_path) not in out and "secret-place" not in out
    monkeypatch.delenv("SHRINK_DATA")
    assert notebook.data_status() == "(unset)"
