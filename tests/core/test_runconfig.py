"""Run configs (YAML + key=value overrides into pydantic) and the logging setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loguru import logger
from pydantic import BaseModel, Field

from dsv4.core.config import ConfigError
from dsv4.core.log import setup_logging
from dsv4.core.runconfig import RunConfigModel, dump_run_config, load_run_config


class Engine(RunConfigModel):
    max_batch_tokens: int = 8192
    page_size: int = Field(default=64, gt=0)
    backend: str = "reference"


class Run(RunConfigModel):
    model: str = "tiny"
    seed: int | None = None
    engine: Engine = Engine()
    stop: list[str] = []


class Plain(BaseModel):  # a schema that does not use RunConfigModel still gets unknown-key errors
    engine: Engine | None = None


def yaml_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def error(*args: object) -> str:
    with pytest.raises(ConfigError) as e:
        load_run_config(Run, *args)  # type: ignore[arg-type]
    return str(e.value)


def test_defaults() -> None:
    assert load_run_config(Run, None, []) == Run()


def test_precedence(tmp_path: Path) -> None:
    p = yaml_file(tmp_path, "model: flash\nengine:\n  max_batch_tokens: 100\n  page_size: 32\n")
    cfg = load_run_config(Run, p, ["engine.page_size=16", "seed=7", "engine.page_size=8", "stop=[a,b]"])
    assert cfg == Run(model="flash", seed=7, engine=Engine(max_batch_tokens=100, page_size=8), stop=["a", "b"])
    assert load_run_config(Run, p, []).engine == Engine(max_batch_tokens=100, page_size=32)  # backend default kept


def test_override_values_parse_yaml_style() -> None:
    cfg = load_run_config(Run, None, ["seed=null", "model=123", "engine.backend=a=b"])
    assert cfg.seed is None and cfg.model == "123" and cfg.engine.backend == "a=b"


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = Run(model="flash", seed=3, engine=Engine(page_size=16), stop=["</s>"])
    assert load_run_config(Run, yaml_file(tmp_path, dump_run_config(cfg)), []) == cfg


def test_bad_value_names_dotted_key() -> None:
    msg = error(None, ["engine.max_batch_tokens=abc"])
    assert "engine.max_batch_tokens: Input should be a valid integer" in msg and "'abc'" in msg
    assert "engine.page_size: Input should be greater than 0" in error(None, ["engine.page_size=0"])


def test_unknown_keys(tmp_path: Path) -> None:
    msg = error(None, ["engine.max_batch_token=5"])
    assert "engine.max_batch_token: unknown key" in msg and "engine.max_batch_tokens" in msg
    assert "colour: unknown key" in error(yaml_file(tmp_path, "colour: red\n"), [])
    with pytest.raises(ConfigError, match="engine.pagesize: unknown key; did you mean 'engine.page_size'"):
        load_run_config(Plain, None, ["engine.pagesize=3"])
    assert load_run_config(Plain, None, ["engine.page_size=3"]).engine == Engine(page_size=3)


@pytest.mark.parametrize("bad", ["engine.page_size", "=3", "engine.page_size 3"])
def test_override_without_equals(bad: str) -> None:
    msg = error(None, [bad])
    assert repr(bad) in msg and "key=value" in msg


def test_bad_files(tmp_path: Path) -> None:
    assert "no such run config file" in error(tmp_path / "missing.yaml", [])
    assert "mapping" in error(yaml_file(tmp_path, "- a\n- b\n"), [])
    assert "not valid YAML" in error(yaml_file(tmp_path, "a: [1,\n"), [])


# --- logging --------------------------------------------------------------------------------------
def test_setup_logging(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "run.log"
    try:
        setup_logging("info", json=True, file=str(log))
        setup_logging("info", json=True, file=str(log))  # idempotent: still one record per call
        logger.debug("hidden")
        logger.info("shown")
        lines = log.read_text().splitlines()
        assert [json.loads(x)["record"]["message"] for x in lines] == ["shown"]
        # stderr: one JSON record per line (parsed, not searched: loguru's record fields change by release)
        records = [json.loads(x)["record"] for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert [r["message"] for r in records] == ["shown"]

        monkeypatch.setenv("DSV4_LOG_LEVEL", "debug")
        setup_logging()
        logger.debug("now visible")
        assert "now visible" in capsys.readouterr().err
        monkeypatch.setenv("DSV4_LOG_LEVEL", "loud")
        with pytest.raises(ValueError, match="DSV4_LOG_LEVEL"):
            setup_logging()
    finally:
        setup_logging("WARNING")
