"""Sidecar settings: flags over environment over file over defaults; errors name the fix."""

from __future__ import annotations

import pytest

from detector.config import HookSettings, default_layers, parse_layers
from detector.sidecar.app import SettingsError, load_settings


def test_precedence_flags_env_file(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text('grpc_address = "127.0.0.1:7001"\nmetrics_port = 7002\nmax_streams = 3\n')
    assert load_settings(cfg).grpc_address == "127.0.0.1:7001"
    monkeypatch.setenv("LIE_DETECTOR_GRPC_ADDRESS", "127.0.0.1:7003")
    settings = load_settings(cfg)
    assert settings.grpc_address == "127.0.0.1:7003"  # env beats file
    assert settings.metrics_port == 7002 and settings.max_streams == 3  # file beats defaults
    assert load_settings(cfg, grpc_address="127.0.0.1:7004").grpc_address == "127.0.0.1:7004"


def test_yaml_and_json_files(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("span_kinds: [claim]\n")
    (tmp_path / "b.json").write_text('{"span_kinds": ["sentence"]}')
    assert load_settings(tmp_path / "a.yaml").span_kinds == ["claim"]
    assert load_settings(tmp_path / "b.json").span_kinds == ["sentence"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"grpc_address": "no-port"}, "grpc_address (LIE_DETECTOR_GRPC_ADDRESS)"),
        ({"probes": ["/does/not/exist"]}, "probe directories not found: /does/not/exist"),
        ({"model_dir": "/tmp"}, "is not a model folder"),
        ({"span_kinds": ["paragraph"]}, "unknown span kinds ['paragraph']"),
        ({"metrics_port": 70000}, "metrics_port"),
    ],
)
def test_errors_say_what_to_fix(overrides, needle) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, **overrides)
    assert needle in str(err.value)


def test_missing_or_unknown_config_file(tmp_path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    (tmp_path / "x.ini").write_text("")
    with pytest.raises(SettingsError, match="use .toml, .yaml or .json"):
        load_settings(tmp_path / "x.ini")


def test_hook_settings_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("LIE_DETECTOR_LAYERS", "22, 8,15,8")
    monkeypatch.setenv("LIE_DETECTOR_DISABLE", "1")
    settings = HookSettings()
    assert settings.layer_list == [8, 15, 22] and settings.disable
    monkeypatch.setenv("LIE_DETECTOR_LAYERS", "eight")
    with pytest.raises(ValueError, match="integers"):
        HookSettings()


def test_layer_helpers() -> None:
    assert parse_layers("") is None
    assert default_layers(30) == [8, 15, 22]
    assert all(1 <= k < 4 for k in default_layers(4))


def test_span_kinds_of_older_configs_are_judged_as_claims(tmp_path) -> None:
    (tmp_path / "old.yaml").write_text("span_kinds: [entity, word, sentence]\n")
    assert load_settings(tmp_path / "old.yaml").span_kinds == ["claim", "sentence"]
