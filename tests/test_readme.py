"""Every Python example in the README runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("source", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(source, monkeypatch):
    monkeypatch.setenv("FIREMPO_BACKEND", "auto")
    exec(compile(source, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_family_table_is_the_generated_one():
    """docs/families_table.py writes one block into both files; a hand edit of either shows here."""
    begin, end = "<!-- families-table:begin -->", "<!-- families-table:end -->"
    blocks = []
    for path in (README, README.parent / "docs" / "families.md"):
        text = path.read_text(encoding="utf-8")
        blocks.append(text[text.index(begin) : text.index(end)])
    assert blocks[0] == blocks[1]
    assert "| `gemma3` | Gemma3ForConditionalGeneration" in blocks[0]


def test_readme_engine_table_is_the_generated_one_and_names_existing_tests():
    """The engine table is test_engines.table(); each of its marks is a test that exists, parameter and all."""
    import ast

    from test_engines import ENGINES, TABLE, table

    text = README.read_text(encoding="utf-8")
    begin, end = "<!-- engines-table:begin -->\n", "\n<!-- engines-table:end -->"
    assert text[text.index(begin) + len(begin) : text.index(end)] == table()
    for cells in TABLE.values():
        for test in (cell for cell in cells.values() if "::" in cell):
            module, _, name = test.partition("::")
            function, _, param = name.partition("[")
            tree = ast.parse((README.parent / "tests" / module).read_text(encoding="utf-8"))
            assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, test
            assert not param or param.rstrip("]") in ENGINES, test
