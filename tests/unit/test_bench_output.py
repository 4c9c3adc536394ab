"""The benchmarks' one output writer (tpcomm/bench/output.py): what each flag writes, the plot's
name in the markdown, the checks before a run, and the shared table layouts."""
import argparse
import json

import pytest

from tpcomm.bench.args import check_outputs
from tpcomm.bench.output import columns, markdown_table, write_outputs
from tpcomm.cli.command import UsageError


def test_every_output_from_one_call(tmp_path, capsys):
    (tmp_path / "md").mkdir()
    args = argparse.Namespace(json=str(tmp_path / "r.json"), markdown=str(tmp_path / "md/r.md"),
                              plot=str(tmp_path / "r.png"))
    order = []

    def plot(path):
        order.append("plot")
        open(path, "w").write("png")

    def markdown(plot_name):
        order.append("markdown")
        return f"# run\n![plot]({plot_name})\n"

    write_outputs(args, "# table\n", doc={"rows": [1, 2], "when": object.__name__},
                  plot=plot, markdown=markdown)
    assert capsys.readouterr().out == "# table\n"
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1, 2], "when": "object"}
    assert order == ["plot", "markdown"]       # the markdown names a plot that exists
    assert (tmp_path / "md/r.md").read_text() == "# run\n![plot](../r.png)\n"


def test_flags_left_out_write_nothing(tmp_path, capsys):
    args = argparse.Namespace(json=None, markdown=None)      # a benchmark without --plot
    write_outputs(args, "text\n", doc={"a": 1}, markdown=lambda name: pytest.fail("no --markdown"),
                  plot=lambda path: pytest.fail("no --plot"))
    assert capsys.readouterr().out == "text\n" and not list(tmp_path.iterdir())
    args = argparse.Namespace(json=None, markdown=str(tmp_path / "m.md"), plot=None)
    write_outputs(args, "", markdown=lambda name: f"plot {name}\n")
    assert (tmp_path / "m.md").read_text() == "plot None\n"


def test_outputs_are_checked_before_the_run(tmp_path):
    check_outputs(argparse.Namespace(json=str(tmp_path / "ok.json")))
    with pytest.raises(UsageError, match="--markdown .*expected a file name"):
        check_outputs(argparse.Namespace(json=None, markdown=str(tmp_path)))
    with pytest.raises(UsageError, match="--plot .*does not exist"):
        check_outputs(argparse.Namespace(plot=str(tmp_path / "nowhere" / "p.png")))


def test_table_layouts():
    head, body = ["size", "us", "note"], [["4K", "12.5", "a"], ["1M", "3", "longer"]]
    assert columns(head, body) == ["size    us    note", "  4K  12.5       a",
                                   "  1M     3  longer"]
    assert columns(head, body, lead=("# ", "  "), free_last=True) == [
        "# size    us  note", "    4K  12.5  a", "    1M     3  longer"]
    assert columns(head, [], lead=("# ", "  ")) == ["# size  us  note"]
    assert markdown_table(head, body, left=1, free_last=True).splitlines()[:2] == [
        "| size | us | note |", "| --- | ---: | --- |"]
