"""The README says what the code does: its settings table and its commands are generated or checked."""

from __future__ import annotations

from pathlib import Path

from llm_worker.settings import config

ROOT = Path(__file__).parent.parent


def test_the_readme_settings_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert table.strip() == config.markdown_table().strip(), "run `llm-worker check-config --table` into the README"


def test_the_readme_table_of_the_provider_plugins_settings_is_the_generated_one() -> None:
    from llm_worker.plugins import anthropic, openrouter

    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- plugin-settings:begin -->\n", 1)[1].split("<!-- plugin-settings:end -->", 1)[0]
    sections = (anthropic.AnthropicSettings, openrouter.OpenRouterSettings)
    assert table.strip() == config.markdown_table(sections).strip(), "run scripts/readme_table.py"


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [
        line.split("#")[0].strip()
        for line in readme.split("```sh", 1)[1].split("```", 1)[0].splitlines()
        if line.strip()
    ]
    assert commands == ["./scripts/demo", "./scripts/test"]
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))
    ]
    assert ci == ["./scripts/test"]


def test_every_setting_in_the_example_toml_is_a_real_one() -> None:
    loaded = config.load({}, str(ROOT / "conf" / "llm-worker.toml"))
    assert loaded.settings.worker.pools["llm-chat"] == 4
