#!/usr/bin/env python3
"""Checks the TOML configs shipped in deploy/ against the documented keys.

    check_config_keys.py

The binaries refuse unknown keys at start. examples/broker.toml,
examples/sidecar.toml and examples/inject.toml (repository root) document
every key, some of them
commented out; a key in a deploy/ config that those files do not mention
would stop the pod, so it fails here first. Also checks that the values the
manifests depend on agree with them (ports, mounted paths).
"""

import re
import sys
import tomllib
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
ROOT = DEPLOY.parent
KEY_RE = re.compile(r"^#?\s*([a-z_][a-z0-9_]*)\s*=")
TABLE_RE = re.compile(r"^#?\s*\[\[?\s*([a-z_.]+)\s*\]\]?\s*$")


def documented(example):
    """section.key names mentioned in an example file, commented or not."""
    keys = set()
    section = ""
    for line in example.read_text().splitlines():
        m = TABLE_RE.match(line)
        if m:
            section = m.group(1)
            keys.add(section)
            continue
        m = KEY_RE.match(line)
        if m:
            keys.add(f"{section}.{m.group(1)}" if section else m.group(1))
    return keys


def used(data, prefix=""):
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield name
            yield from used(v, name)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            yield name
            for x in v:
                yield from used(x, name)
        else:
            yield name


def main():
    failures = []
    checks = [
        (ROOT / "examples" / "broker.toml", sorted(DEPLOY.glob("overlays/*/broker.toml"))),
        (ROOT / "examples" / "sidecar.toml", sorted(DEPLOY.glob("examples/*/sidecar.toml"))),
        (ROOT / "examples" / "inject.toml", sorted(DEPLOY.glob("components/*/inject.toml"))),
    ]
    n = 0
    for example, configs in checks:
        if not example.exists():
            failures.append(f"{example} is missing")
            continue
        allowed = documented(example)
        for cfg in configs:
            n += 1
            data = tomllib.loads(cfg.read_text())
            for key in used(data):
                if key not in allowed:
                    failures.append(f"{cfg.relative_to(ROOT)}: key {key} is not documented in {example.relative_to(ROOT)}")
            if example.name == "broker.toml":
                srv = data.get("server", {})
                want = {"listen": "0.0.0.0:8443", "ops_listen": "0.0.0.0:9090"}
                for k, v in want.items():
                    if srv.get(k) != v:
                        failures.append(f"{cfg.relative_to(ROOT)}: server.{k} must be {v} (the ports in deploy/base)")
                if data.get("admin", {}).get("listen") != "0.0.0.0:8444":
                    failures.append(f"{cfg.relative_to(ROOT)}: admin.listen must be 0.0.0.0:8444 (deploy/base)")
                for k in ("tls_cert_file", "tls_key_file"):
                    if not str(srv.get(k, "")).startswith("/etc/secrets-broker/tls/"):
                        failures.append(f"{cfg.relative_to(ROOT)}: server.{k} must be under /etc/secrets-broker/tls/ (mounted Secret)")
            elif example.name == "inject.toml":
                srv = data.get("server", {})
                # The ports and mounts of components/injector/deployment.yaml.
                want = {"listen": "0.0.0.0:8443", "ops_listen": "0.0.0.0:9090"}
                for k, v in want.items():
                    if srv.get(k) != v:
                        failures.append(f"{cfg.relative_to(ROOT)}: server.{k} must be {v} (the ports in components/injector)")
                for k in ("tls_cert_file", "tls_key_file"):
                    if not str(srv.get(k, "")).startswith("/etc/secrets-broker-injector/tls/"):
                        failures.append(f"{cfg.relative_to(ROOT)}: server.{k} must be under /etc/secrets-broker-injector/tls/ (mounted Secret)")
                ca = str(data.get("sidecar", {}).get("broker_ca_file", ""))
                if not ca.startswith("/etc/secrets-broker-injector/broker-ca/"):
                    failures.append(f"{cfg.relative_to(ROOT)}: sidecar.broker_ca_file must be under /etc/secrets-broker-injector/broker-ca/ (mounted Secret)")
            else:
                hl = data.get("health_listen", "")
                if not hl.endswith(":8099") or hl.startswith("127."):
                    failures.append(f"{cfg.relative_to(ROOT)}: health_listen must be <pod address>:8099 for the probes, got {hl!r}")
    for f in failures:
        print(f"FAIL {f}")
    print(f"config keys: {n} config files checked, {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
