"""The README stays in step with the code: every setting, error code and message type is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmgine_ws import ErrorCode, create_app
from llmgine_ws.config import APIConfig, env_variable
from llmgine_ws.schema import server_message_types

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("field", [f for f in APIConfig.__struct_fields__])
def test_every_setting_is_documented(field: str) -> None:
    assert env_variable(field) in README


@pytest.mark.parametrize("code", [code.value for code in ErrorCode])
def test_every_error_code_is_documented(code: str) -> None:
    assert f"`{code}`" in README


def test_every_message_type_is_documented() -> None:
    runtime = create_app(APIConfig()).state.llmgine
    types = set(runtime.dispatcher.specs) | set(server_message_types(runtime.dispatcher.specs.values()))
    missing = sorted(t for t in types if f"`{t}`" not in README)
    assert not missing, f"undocumented message types: {missing}"


def test_the_quickstart_has_the_two_commands_ci_runs() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    test_command = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
    assert test_command in ci
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^python3 -m venv .*$", quickstart, re.MULTILINE)
    assert commands == ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/llmgine-ws", test_command]
