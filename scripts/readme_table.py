"""Regenerate the settings tables in README.md from the declarations (tests/test_docs.py checks them).

The core's settings, and those the built-in provider plugins declare for themselves.
"""

from pathlib import Path

from llm_worker.plugins import anthropic, openrouter
from llm_worker.settings.config import markdown_table

PLUGIN_SETTINGS = (anthropic.AnthropicSettings, openrouter.OpenRouterSettings)


def replace_between(text: str, marker: str, table: str) -> str:
    head, rest = text.split(f"<!-- {marker}:begin -->\n", 1)
    _, tail = rest.split(f"<!-- {marker}:end -->", 1)
    return f"{head}<!-- {marker}:begin -->\n{table}\n<!-- {marker}:end -->{tail}"


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = replace_between(readme.read_text(), "settings", markdown_table())
    readme.write_text(replace_between(text, "plugin-settings", markdown_table(PLUGIN_SETTINGS)))
