"""Gateway config: validation errors that name the key and the line, JSON Schema, hot reload without dropping
connections, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from meshkit.errors import ConfigurationError
from meshkit.gateway import Gateway, builtin_plugins, load_config, parse_config
from meshkit.gateway.config import json_schema
from tests.gateway.servers import upstream
from tests.servers import free_port

pytestmark = pytest.mark.anyio


def error_of(text: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        parse_config(text, "gw.yaml")
    return str(info.value)


def test_errors_name_the_file_line_and_key() -> None:
    text = """listen:
  port: 8080
routes:
  - name: orders
    path: /api/orders
    service: orders
    timeout: soon
"""
    assert (
        error_of(text)
        == "gw.yaml:7: routes[0].timeout: 'soon' is not a duration (use seconds, or a number with ms, s, m, h or d)"
    )
    assert error_of("listen: {port: 8080, colour: red}\n") == "gw.yaml:1: listen.colour: unknown key"
    tls_and_h2c = error_of("listen:\n  h2c: true\n  tls: {cert: c.pem, key: k.pem}\n")
    assert tls_and_h2c.startswith("gw.yaml:1: listen: ") and "h2c is cleartext HTTP/2" in tls_and_h2c, tls_and_h2c
    message = error_of("routes:\n  - name: a\n    path: /a\n")
    assert message.startswith("gw.yaml:2: routes[0]: ") and "exactly one of service" in message
    assert error_of("routes: [\n").startswith("gw.yaml:2: not valid YAML")
    assert error_of("- a\n- b\n") == "gw.yaml:1: the gateway config must be a mapping (listen:, routes:, ...)"
    two = error_of("listen: {port: -1}\nlimits: {max_body: lots}\n")
    assert two.startswith("2 problems in gw.yaml:")
    assert "gw.yaml:1: listen.port" in two and "gw.yaml:2: limits.max_body" in two


def test_static_targets_take_weights_and_bad_ones_name_their_line() -> None:
    head = "routes:\n  - name: a\n    path: /\n    targets:\n"
    loaded = parse_config(head + '      - "10.0.0.1:80"\n      - {address: "10.0.0.2:80", weight: 2.5}\n')
    (spec,) = loaded.config.routes
    assert [(t.address, t.weight) for t in spec.targets or ()] == [("10.0.0.1:80", 1.0), ("10.0.0.2:80", 2.5)]
    assert error_of(head + '      - "10.0.0.1:80"\n      - {address: "10.0.0.2:80", weight: 0}\n') == (
        "gw.yaml:6: routes[0].targets[1].weight: Input should be greater than 0"
    )
    assert error_of(head + '      - "10.0.0.1"\n') == "gw.yaml:5: routes[0].targets[0]: '10.0.0.1' is not host:port"
    two = error_of(head + '      - "10.0.0.1:80"\n      - address: "10.0.0.2:x"\n        weight: lots\n')
    assert two.startswith("2 problems in gw.yaml:")
    assert "gw.yaml:6: routes[0].targets[1].address: '10.0.0.2:x' is not host:port" in two
    assert "gw.yaml:7: routes[0].targets[1].weight: Input should be a valid number" in two
    assert error_of(head + "      - {address: 10.0.0.1:80, wieght: 2}\n") == (
        "gw.yaml:5: routes[0].targets[0].wieght: unknown key"
    )
    assert error_of(head + "      - 80\n").startswith("gw.yaml:5: routes[0].targets[0]: 80 is not a target")
    assert error_of(head + '      - "10.0.0.1:80"\n      - {address: "10.0.0.1:80", weight: 2}\n') == (
        "gw.yaml:4: routes[0].targets: '10.0.0.1:80' is listed twice (give it a weight instead)"
    )


async def test_plugin_and_route_errors_name_their_line() -> None:
    text = """listen: {port: 0}
routes:
  - name: a
    path: /a
    targets: ["127.0.0.1:9"]
    plugins:
      - access_log: {colour: red}
"""
    gw = Gateway(parse_config(text, "gw.yaml"))
    with pytest.raises(ConfigurationError) as info:
        await gw.start()
    await gw.aclose()
    assert str(info.value).startswith("gw.yaml:7: routes[0].plugins[0].access_log.colour: unknown key")
    gw = Gateway(parse_config(text.replace("access_log: {colour: red}", "no_such_plugin: {}"), "gw.yaml"))
    with pytest.raises(ConfigurationError) as info:
        await gw.start()
    await gw.aclose()
    assert "gw.yaml:7: unknown plugin 'no_such_plugin'" in str(info.value)
    gw = Gateway(
        parse_config(
            text.replace("path: /a", "template: /a/{id}/{id}")
            .replace("      - access_log: {colour: red}\n", "")
            .replace("    plugins:\n", ""),
            "gw.yaml",
        )
    )
    with pytest.raises(ConfigurationError) as info:
        await gw.start()
    await gw.aclose()
    assert "gw.yaml:3" in str(info.value) and "names {id} twice" in str(info.value)


def test_durations_and_sizes() -> None:
    loaded = parse_config(
        "limits: {header_timeout: 250ms, keepalive_timeout: 2m, max_body: 1MiB, max_header_bytes: 16KB}\n"
    )
    limits = loaded.config.limits
    assert (limits.header_timeout, limits.keepalive_timeout) == (0.25, 120.0)
    assert (limits.max_body, limits.max_header_bytes) == (1024 * 1024, 16_000)


def test_the_json_schema_describes_routes_and_every_plugin() -> None:
    kinds = builtin_plugins()
    schema = json.loads(json_schema({name: cls.Options for name, cls in kinds.items()}))
    assert schema["title"] == "meshkit gateway configuration"
    assert "routes" in schema["properties"]
    for name in kinds:
        assert f"plugin_{name}" in schema["$defs"]
    text = json.dumps(schema)
    assert '"access_log"' in text


async def test_reload_swaps_routes_without_dropping_a_keep_alive_connection(tmp_path: Path) -> None:
    async with upstream() as a, upstream() as b:
        file = tmp_path / "gateway.yaml"
        base = 'listen: {port: 0}\nroutes:\n  - name: r\n    path: /\n    targets: ["%s"]\n'
        file.write_text(base % a.target)
        gw = Gateway(load_config(file), path=file)
        await gw.start(watch=True)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                async with s.get(f"http://127.0.0.1:{gw.port}/x") as r:
                    assert r.status == 200
                # a broken file changes nothing
                file.write_text("routes: [\n")
                assert await gw.reload() is False
                file.write_text(base % b.target)
                os.utime(file, (1, 1))  # a different mtime than the first write, whatever the clock's resolution
                async with asyncio.timeout(20):
                    while gw.reloads == 0:  # noqa: ASYNC110 - the file watch is the gateway's own task
                        await asyncio.sleep(0.05)
                async with s.get(f"http://127.0.0.1:{gw.port}/y") as r:
                    assert r.status == 200
                assert [x.path for x in b.seen] == ["/y"]
                assert a.connections == 1  # reusing the gateway's pooled connection
            # one client connection carried both requests across the reload
        finally:
            await gw.aclose()


async def test_the_cli_serves_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with upstream() as a, upstream() as b:
        port = free_port()
        file = tmp_path / "gateway.yaml"
        base = f'listen: {{port: {port}}}\nroutes:\n  - name: r\n    path: /\n    targets: ["%s"]\n'
        file.write_text(base % a.target)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshkit",
            "gateway",
            "--config",
            str(file),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(60):
                line = await proc.stdout.readline()
            assert f"listening on port {port}" in line.decode()
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/one") as r:
                    assert r.status == 200
                file.write_text(base % b.target)
                proc.send_signal(signal.SIGHUP)
                async with asyncio.timeout(30):
                    while not b.seen:
                        async with s.get(f"http://127.0.0.1:{port}/two") as r:
                            assert r.status == 200
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                code = await proc.wait()
            assert code == 0
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode()
            assert "Traceback" not in err
            assert "config reloaded" in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_the_cli_reports_config_errors_without_a_traceback(tmp_path: Path) -> None:
    file = tmp_path / "gateway.yaml"
    file.write_text("routes:\n  - name: a\n    path: /a\n    service: a\n    retries: many\n")
    out = subprocess.run(
        [sys.executable, "-m", "meshkit", "gateway", "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "gateway.yaml:5: routes[0].retries" in out.stderr
    assert "Traceback" not in out.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "meshkit", "gateway", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "no gateway config at" in missing.stderr and "Traceback" not in missing.stderr


ROOT = Path(__file__).resolve().parents[2]


def test_the_published_schema_is_current() -> None:
    """docs/gateway.schema.json is what `meshkit gateway schema` prints (regenerate it when the config changes)."""
    kinds = builtin_plugins()
    current = json_schema({name: cls.Options for name, cls in kinds.items()})
    published = (ROOT / "docs" / "gateway.schema.json").read_text()
    assert json.loads(published) == json.loads(current), "run: meshkit gateway schema > docs/gateway.schema.json"


def test_the_yaml_examples_in_the_docs_and_the_shop_validate() -> None:
    text = (ROOT / "docs" / "gateway.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        parse_config(block.replace("plugins: [{jwt: {...}}]", "plugins: []"), "docs/gateway.md")
    parse_config((ROOT / "examples" / "shop" / "gateway.yaml").read_text(), "gateway.yaml")
