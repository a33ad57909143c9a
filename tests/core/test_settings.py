from __future__ import annotations

from pathlib import Path

import pytest

from meshkit._core.settings import load_settings
from meshkit.errors import SettingsError

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshkit.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env=NO_ENV)
    assert settings.broker.url == "sqlite:///.meshkit/broker.db"
    assert settings.log.level == "INFO"
    assert settings.source_of("broker.url") == "default"


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[broker]\nurl = "redis://file"\n\n[registry]\nurl = "redis://file"\n[log]\nlevel = "debug"\n'
    )
    env = {"MESHKIT_REGISTRY__URL": "etcd://env", "MESHKIT_LOG__LEVEL": "warning"}
    settings = load_settings(path, env=env, overrides={"log.level": "error"})
    assert settings.broker.url == "redis://file"
    assert settings.registry.url == "etcd://env"
    assert settings.log.level == "ERROR"
    assert settings.database.url == "sqlite:///.meshkit/data.db"
    assert settings.source_of("broker.url") == "meshkit.toml:2"
    assert settings.source_of("registry.url") == "environment variable MESHKIT_REGISTRY__URL"
    assert settings.source_of("log.level") == "argument"
    assert settings.source_of("database.url") == "default"


def test_overrides_take_nested_dicts_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env=NO_ENV, overrides={"tracing": {"sample_ratio": 0.25, "enabled": False}})
    assert (settings.tracing.sample_ratio, settings.tracing.enabled) == (0.25, False)
    assert settings.source_of("tracing.sample_ratio") == "argument"


def test_the_default_file_is_found_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, '[broker]\nurl = "memory://"\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings(env=NO_ENV).broker.url == "memory://"
    other = tmp_path / "other.toml"
    other.write_text('[broker]\nurl = "nats://x"\n')
    assert load_settings(env={"MESHKIT_CONFIG": str(other)}).broker.url == "nats://x"


def test_an_unknown_top_level_table_names_file_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, '[broker]\nurl = "memory://"\n\n[brokr]\nurl = "x"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV)
    assert info.value.key == "brokr"
    assert info.value.source == "meshkit.toml:4"
    assert info.value.hint == "did you mean 'broker'?"
    assert "unknown setting 'brokr'" in str(info.value)


def test_an_unknown_nested_key_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "# comment\n[tracing]\nenabled = true\nsample_rate = 0.5\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV)
    assert (info.value.key, info.value.source) == ("tracing.sample_rate", "meshkit.toml:4")
    assert info.value.hint == "did you mean 'tracing.sample_ratio'?"


def test_dotted_keys_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'broker.url = "redis://dotted"\nlog.levl = "INFO"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV)
    assert (info.value.key, info.value.source) == ("log.levl", "meshkit.toml:2")


def test_an_unknown_key_with_nothing_close_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "[log]\nzzz = 1\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV)
    assert info.value.hint == "known keys here: level, format"


def test_an_unknown_environment_variable_is_named_with_a_suggestion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as info:
        load_settings(env={"MESHKIT_BROKR__URL": "redis://x"})
    assert info.value.source == "environment variable MESHKIT_BROKR__URL"
    assert info.value.hint == "did you mean MESHKIT_BROKER__URL?"
    with pytest.raises(SettingsError, match="names a section") as info:
        load_settings(env={"MESHKIT_BROKER": "redis://x"})
    assert info.value.hint == "set one of its keys: MESHKIT_BROKER__URL"
    # process switches are not settings
    assert load_settings(env={"MESHKIT_DEBUG": "1", "MESHKIT_SOAK": "1"}).broker.url.startswith("sqlite")


def test_bad_values_name_key_source_and_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as info:
        load_settings(env={"MESHKIT_TRACING__SAMPLE_RATIO": "2"})
    assert info.value.key == "tracing.sample_ratio"
    assert info.value.source == "environment variable MESHKIT_TRACING__SAMPLE_RATIO"
    assert "less than or equal to 1" in str(info.value)

    path = write(tmp_path, '[broker]\nurl = "mqtt://x"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV)
    assert info.value.source == "meshkit.toml:2"
    assert "unknown scheme 'mqtt'" in str(info.value) and "redis://" in str(info.value)

    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV, overrides={"broker.url": "memory://", "log.level": "LOUD"})
    assert (info.value.key, info.value.source) == ("log.level", "argument")

    with pytest.raises(SettingsError, match="unknown setting 'brokerz'"):
        load_settings(path, env=NO_ENV, overrides={"brokerz": 1})


def test_tracing_protocol_and_headers_come_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    defaults = load_settings(env=NO_ENV).tracing
    assert (defaults.protocol, defaults.endpoint, defaults.headers) == ("http/protobuf", None, {})

    env = {
        "MESHKIT_TRACING__PROTOCOL": "GRPC",
        "MESHKIT_TRACING__ENDPOINT": "jaeger:4317",  # host:port is a gRPC endpoint (not a URL for OTLP/HTTP)
        "MESHKIT_TRACING__HEADERS": '{"x-api-key": "s3cret"}',  # tables are JSON in the environment
    }
    tracing = load_settings(env=env).tracing
    assert (tracing.protocol, tracing.endpoint, tracing.headers) == ("grpc", "jaeger:4317", {"x-api-key": "s3cret"})
    settings = load_settings(env=env)
    assert settings.source_of("tracing.protocol") == "environment variable MESHKIT_TRACING__PROTOCOL"
    assert settings.source_of("tracing.headers") == "environment variable MESHKIT_TRACING__HEADERS"

    path = write(
        tmp_path,
        '[tracing]\nprotocol = "grpc"\nendpoint = "https://api.example.com:443"\n'
        'headers = { "x-honeycomb-team" = "key" }\n',
    )
    settings = load_settings(path, env=NO_ENV)
    assert settings.tracing.headers == {"x-honeycomb-team": "key"}
    assert settings.source_of("tracing.headers") == "meshkit.toml:4"
    # the environment wins over the file, for the protocol as for every key
    over = load_settings(path, env={"MESHKIT_TRACING__PROTOCOL": "http/protobuf"})
    assert over.tracing.protocol == "http/protobuf"
    assert over.tracing.endpoint == "https://api.example.com:443"


def test_tracing_endpoint_is_checked_against_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as info:  # host:port is not an OTLP/HTTP URL
        load_settings(env={"MESHKIT_TRACING__ENDPOINT": "jaeger:4318"})
    assert info.value.key == "tracing.endpoint"
    assert "http://" in str(info.value)

    with pytest.raises(SettingsError) as info:
        load_settings(env={"MESHKIT_TRACING__PROTOCOL": "zipkin"})
    assert (info.value.key, info.value.source) == ("tracing.protocol", "environment variable MESHKIT_TRACING__PROTOCOL")
    assert "'http/protobuf'" in str(info.value) and "'grpc'" in str(info.value)

    with pytest.raises(SettingsError, match="not valid JSON"):
        load_settings(env={"MESHKIT_TRACING__HEADERS": "x-api-key=s3cret"})

    path = write(tmp_path, '[tracing]\nprotocol = "grpc"\nendpoint = "http://jaeger:4317/v1/traces"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV)
    assert (info.value.key, info.value.source) == ("tracing.endpoint", "meshkit.toml:3")
    assert "has no path" in str(info.value) and "http/protobuf" in str(info.value)


def test_toml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[broker]\nurl = "unterminated\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, env=NO_ENV)
    assert info.value.source == "meshkit.toml:2"
    assert "not valid TOML" in str(info.value)


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env=NO_ENV)


def test_settings_are_frozen_and_flat_lists_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env=NO_ENV)
    with pytest.raises(ValueError, match="frozen"):
        settings.broker.url = "x"
    assert list(settings.flat()) == [
        "broker.url",
        "registry.url",
        "database.url",
        "log.level",
        "log.format",
        "tracing.enabled",
        "tracing.protocol",
        "tracing.endpoint",
        "tracing.headers",
        "tracing.sample_ratio",
        "services",
        "gateway",
    ]
    with pytest.raises(KeyError):
        settings.source_of("nope")


def test_services_are_listed_as_module_attribute_with_clear_errors(tmp_path: Path) -> None:
    toml = tmp_path / "meshkit.toml"
    toml.write_text('[services.orders]\napp = "orders:service"\nreplicas = 2\n\n[services.email]\napp = "email"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(toml, env=NO_ENV)
    assert "services.email.app" in str(info.value) and "module:attribute" in str(info.value)
    assert "meshkit.toml:6" in str(info.value)
    toml.write_text('[services.orders]\napp = "shop.orders:service"\nreplicas = 2\n')
    settings = load_settings(toml, env=NO_ENV)
    assert settings.services["orders"].app == "shop.orders:service"
    assert settings.services["orders"].replicas == 2
    assert settings.flat()["services"]["orders"]["replicas"] == 2
