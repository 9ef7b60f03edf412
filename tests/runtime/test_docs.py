"""docs/runtime.md embeds the ISA table generated from the one declaration table."""

from pathlib import Path

from qcompiler.runtime.isa import isa_table


def test_docs_isa_table_is_current():
    text = (Path(__file__).parents[2] / "docs" / "runtime.md").read_text()
    assert isa_table() in text, "regenerate the table in docs/runtime.md from qcompiler.runtime.isa.isa_table()"
