"""Settings: SD_ prefix, .env, defaults from the operator spec, and errors that never leak values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.config import Backend, Settings, SettingsError, load_settings

CANARY = "canary-Zq8vX2-value"


def test_defaults_follow_the_operator_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port) == ("0.0.0.0", 7860)
    assert settings.device == "auto"
    assert settings.default_backend is Backend.SD
    assert settings.safety_checker is True
    assert settings.api_key is None
    assert settings.cors_origins == []


def test_environment_variables_use_the_sd_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_PORT", "9000")
    monkeypatch.setenv("SD_DEFAULT_BACKEND", "flux-api")
    monkeypatch.setenv("SD_DEVICE", "cpu")
    monkeypatch.setenv("SD_SAFETY_CHECKER", "false")
    monkeypatch.setenv("SD_CORS_ORIGINS", "https://a.example, http://b.example:8080")
    settings = load_settings(_env_file=None)
    assert settings.port == 9000
    assert settings.default_backend is Backend.FLUX_API
    assert settings.device == "cpu"
    assert settings.safety_checker is False
    assert settings.cors_origins == ["https://a.example", "http://b.example:8080"]


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("SD_MODEL_ID=tiny-sdxl\nSD_MAX_STEPS=12\nSD_API_KEY=secret-from-dotenv\n")
    settings = load_settings(_env_file=env_file)
    assert settings.model_id == "tiny-sdxl"
    assert settings.max_steps == 12
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "secret-from-dotenv"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SD_PORT", CANARY),
        ("SD_DEVICE", CANARY),
        ("SD_DEFAULT_BACKEND", CANARY),
        ("SD_MAX_STEPS", CANARY),
        ("SD_SAFETY_CHECKER", CANARY),
        ("SD_CORS_ORIGINS", CANARY),
        ("SD_PORT", "70000"),
    ],
)
def test_invalid_setting_names_the_setting_not_the_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    message = str(caught.value)
    assert name in message
    assert value not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_secrets_are_never_printed() -> None:
    settings = Settings(_env_file=None, api_key=CANARY, huggingface_token=CANARY + "-hf", webhook_secret=CANARY + "-wh")
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert CANARY not in text


def test_empty_api_key_means_no_auth() -> None:
    assert Settings(_env_file=None, api_key="  ").api_key is None


def test_wildcard_cors_is_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None, cors_origins="*")
    assert "SD_CORS_ORIGINS" in str(caught.value)


@pytest.mark.parametrize(
    "host, public",
    [
        ("0.0.0.0", True),
        ("127.0.0.1", False),
        ("localhost", False),
        ("::1", False),
        ("192.168.1.5", True),
        ("::", True),
    ],
)
def test_public_binding_is_detected(host: str, public: bool) -> None:
    assert Settings(_env_file=None, host=host).binds_publicly is public


def _run(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_")}
    env.update(env_extra)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_serve_refuses_to_start_with_an_invalid_setting(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "imagegen.cli", "serve"], {"SD_MAX_WIDTH": CANARY}, tmp_path)
    assert result.returncode == 2
    assert "SD_MAX_WIDTH" in result.stderr
    assert CANARY not in result.stderr + result.stdout


def test_uvicorn_start_command_refuses_an_invalid_setting(tmp_path: Path) -> None:
    result = _run(
        [sys.executable, "-m", "uvicorn", "imagegen.main:app", "--port", "0"], {"SD_DEVICE": CANARY}, tmp_path
    )
    assert result.returncode != 0
    assert "SD_DEVICE" in result.stderr
    assert CANARY not in result.stderr + result.stdout


def test_help_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, contextlib, io\n"
        "from imagegen import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = _run([sys.executable, "-c", code], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_the_app_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from imagegen.main import create_app\n"
        "from imagegen.config import Settings\n"
        f"create_app(Settings(_env_file=None, output_dir=r'{tmp_path}/o', data_dir=r'{tmp_path}/d'))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = _run([sys.executable, "-c", code], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_lora_settings() -> None:
    defaults = load_settings(_env_file=None)
    assert defaults.lora_folder == Path("models/loras") and (defaults.max_loras, defaults.max_loaded_loras) == (4, 8)
    assert load_settings(_env_file=None, lora_dir="/srv/loras").lora_folder == Path("/srv/loras")
    assert load_settings(_env_file=None, lora_dir="").lora_dir is None  # an empty .env line: not set
    with pytest.raises(SettingsError, match="SD_MAX_LOADED_LORAS must be at least SD_MAX_LORAS"):
        load_settings(_env_file=None, max_loras=6, max_loaded_loras=4)
