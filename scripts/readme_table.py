"""Regenerate the settings table in README.md from the declarations (tests/test_docs.py checks it)."""

from pathlib import Path

from llm_worker.settings.config import markdown_table

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- settings:begin -->\n", 1)
_, tail = rest.split("<!-- settings:end -->", 1)
readme.write_text(f"{head}<!-- settings:begin -->\n{markdown_table()}\n<!-- settings:end -->{tail}")
