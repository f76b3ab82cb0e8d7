"""Configuration mistakes a new user makes fail (or warn) early, naming the variable (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from llmgine_ws import APIConfig, ConfigError, ConfigWarning


def test_a_misspelled_variable_warns_with_the_closest_valid_name() -> None:
    with pytest.warns(ConfigWarning, match="LLMGINE_API_MAX_SESION .*did you mean LLMGINE_API_MAX_SESSIONS"):
        config = APIConfig.from_env({"LLMGINE_API_MAX_SESION": "5"})
    assert config.max_sessions == APIConfig().max_sessions  # ignored, but no longer silently
    with pytest.warns(ConfigWarning, match="did you mean LLMGINE_API_KEYS"):
        APIConfig.from_env({"LLMGINE_API_KEY": "k"})
    with pytest.warns(ConfigWarning, match="LLMGINE_API_NOTHING_LIKE_IT is not an llmgine_ws setting"):
        APIConfig.from_env({"LLMGINE_API_NOTHING_LIKE_IT": "1"})


def test_valid_and_unrelated_variables_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        APIConfig.from_env({"LLMGINE_API_MAX_SESSIONS": "5", "LLMGINE_API_KEYS": "a,b", "OTHER_PREFIX_X": "1"})


@pytest.mark.parametrize("origin", ["example.com", "app.example.com:8080", "https://example.com/path", "ftp://x.org"])
def test_an_origin_without_a_scheme_is_refused(origin: str) -> None:
    with pytest.raises(ConfigError, match=r"LLMGINE_API_ALLOWED_ORIGINS.*scheme://host") as error:
        APIConfig.from_env({"LLMGINE_API_ALLOWED_ORIGINS": f"https://ok.example.com,{origin}"})
    if origin == "example.com":
        assert "'https://example.com'" in str(error.value)  # the fix is spelled out
    with pytest.raises(ValueError, match="allowed_origins"):
        APIConfig(allowed_origins=[origin])


def test_valid_origins_pass() -> None:
    config = APIConfig.from_env({"LLMGINE_API_ALLOWED_ORIGINS": "https://a.example.com, http://localhost:5173,*"})
    assert config.allowed_origins == ["https://a.example.com", "http://localhost:5173", "*"]


@pytest.mark.parametrize("variable", ["LLMGINE_API_RATE_LIMIT", "LLMGINE_API_USER_RATE_LIMIT",
                                      "LLMGINE_API_BROADCAST_RATE_LIMIT"])
def test_a_negative_rate_limit_names_its_variable(variable: str) -> None:
    with pytest.raises(ConfigError, match=f"{variable}='-1'.*must be >= 0"):
        APIConfig.from_env({variable: "-1"})


def _cli(code: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, timeout=60)


def test_jwt_key_without_the_jwt_extra_is_a_clean_cli_error() -> None:
    # The venv has the extra installed: hide it, as on a machine without it.
    result = _cli("import sys; sys.modules['jwt'] = None\n"
                  "from llmgine_ws.cli import main\n"
                  "sys.exit(main(['--port', '1']))", LLMGINE_API_JWT_KEY="secret")
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("llmgine-ws: LLMGINE_API_JWT_KEY is set: JWT authentication needs the \"jwt\" extra")


def test_a_misspelled_variable_is_reported_by_the_cli() -> None:
    result = _cli("import sys\nfrom llmgine_ws.cli import main\nsys.exit(main(['--help']))",
                  LLMGINE_API_RATE_LIMT="5")
    assert result.returncode == 0
    assert b"LLMGINE_API_RATE_LIMT is not an llmgine_ws setting and is ignored; did you mean LLMGINE_API_RATE_LIMIT?" \
        in result.stderr
