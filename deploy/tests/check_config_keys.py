#!/usr/bin/env python3
"""Checks the TOML configs shipped in deploy/ against the documented keys.

    check_config_keys.py [RENDERED.yaml...]

The binaries refuse unknown keys at start. examples/broker.toml,
examples/sidecar.toml and examples/inject.toml (repository root) document
every key, some of them
commented out; a key in a deploy/ config that those files do not mention
would stop the pod, so it fails here first. Also checks that the values the
manifests depend on agree with them (ports, mounted paths).

The Helm chart (deploy/helm/secrets-broker) writes broker.toml and
inject.toml from values: the files given (chart renders) are checked the same
way, from their ConfigMaps; and the config keys values.schema.json accepts
must be documented keys, and every documented key must be one the schema
accepts or the chart sets itself, so the two cannot drift apart.
"""

import re
import json
import sys
import tomllib
from pathlib import Path

import yaml

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


def check_data(name, data, example, allowed, failures):
    """One config (parsed): keys documented, ports and mounts as the manifests have them."""
    for key in used(data):
        if key not in allowed:
            failures.append(f"{name}: key {key} is not documented in {example.relative_to(ROOT)}")
    if example.name == "broker.toml":
        srv = data.get("server", {})
        want = {"listen": "0.0.0.0:8443", "ops_listen": "0.0.0.0:9090"}
        for k, v in want.items():
            if srv.get(k) != v:
                failures.append(f"{name}: server.{k} must be {v} (the ports in deploy/base)")
        if "admin" in data and data["admin"].get("listen") != "0.0.0.0:8444":
            failures.append(f"{name}: admin.listen must be 0.0.0.0:8444 (deploy/base)")
        for k in ("tls_cert_file", "tls_key_file"):
            if not str(srv.get(k, "")).startswith("/etc/secrets-broker/tls/"):
                failures.append(f"{name}: server.{k} must be under /etc/secrets-broker/tls/ (mounted Secret)")
        audit = data.get("audit", {})
        if "key_file" in audit and not str(audit["key_file"]).startswith("/etc/secrets-broker/audit/"):
            failures.append(f"{name}: audit.key_file must be under /etc/secrets-broker/audit/ (its own mounted Secret)")
    elif example.name == "inject.toml":
        srv = data.get("server", {})
        # The ports and mounts of components/injector/deployment.yaml.
        want = {"listen": "0.0.0.0:8443", "ops_listen": "0.0.0.0:9090"}
        for k, v in want.items():
            if srv.get(k) != v:
                failures.append(f"{name}: server.{k} must be {v} (the ports in components/injector)")
        for k in ("tls_cert_file", "tls_key_file"):
            if not str(srv.get(k, "")).startswith("/etc/secrets-broker-injector/tls/"):
                failures.append(f"{name}: server.{k} must be under /etc/secrets-broker-injector/tls/ (mounted Secret)")
        ca = str(data.get("sidecar", {}).get("broker_ca_file", ""))
        if not ca.startswith("/etc/secrets-broker-injector/broker-ca/"):
            failures.append(f"{name}: sidecar.broker_ca_file must be under /etc/secrets-broker-injector/broker-ca/ (mounted Secret)")
    else:
        # The detail (secret names, rule IDs) on loopback; the kubelet's
        # probes (and the PodMonitor) on the status-only probe port, 8098 on
        # the pod address (the deployment's sidecar-http).
        hl = data.get("health_listen", "127.0.0.1:8099")
        if hl != "off" and not (hl.startswith("127.") or hl.startswith("[::1]")):
            failures.append(f"{name}: health_listen must be on loopback (it names secrets and rule IDs), got {hl!r}")
        pl = data.get("probe_listen", "")
        if not pl.endswith(":8098") or pl.startswith("127.") or pl.startswith("[::1]"):
            failures.append(f"{name}: probe_listen must be <pod address>:8098 for the probes, got {pl!r}")


def schema_keys(node, prefix=""):
    """section.key names under an object schema (arrays of objects: their items' keys)."""
    for k, sub in (node.get("properties") or {}).items():
        name = f"{prefix}.{k}" if prefix else k
        yield name
        if sub.get("type") == "array" or sub.get("type") == ["array"]:
            sub = sub.get("items") or {}
        if "object" in (sub.get("type") if isinstance(sub.get("type"), list) else [sub.get("type")]):
            yield from schema_keys(sub, name)


# Keys the chart writes itself from its manifests (values.schema.json does not
# accept them), and keys reserved in the schema that the chart refuses to
# render until the binary accepts them.
CHART_SET = {
    "broker.toml": {"server.listen", "server.ops_listen", "server.tls_cert_file", "server.tls_key_file",
                    "admin.listen", "admin.client_ca_file", "store.key_file", "audit.key_file"},
    "inject.toml": {"server.listen", "server.ops_listen", "server.tls_cert_file", "server.tls_key_file",
                    "sidecar.image", "sidecar.broker_url", "sidecar.broker_ca_file"},
}
RESERVED = {"broker.toml": set(), "inject.toml": set()}


def check_schema(examples, failures):
    schema_file = DEPLOY / "helm" / "secrets-broker" / "values.schema.json"
    schema = json.loads(schema_file.read_text())
    props = schema["properties"]
    for example, node in ((examples["broker.toml"], props["broker"]["properties"]["config"]),
                          (examples["inject.toml"], props["injector"]["properties"]["config"])):
        documented_keys = documented_set(example)
        accepted = set(schema_keys(node))
        for k in sorted(accepted - documented_keys - RESERVED[example.name]):
            failures.append(f"{schema_file.relative_to(ROOT)}: accepts {k}, which {example.relative_to(ROOT)} does not document (the binary would refuse it)")
        for k in sorted(documented_keys - accepted - CHART_SET[example.name]):
            failures.append(f"{example.relative_to(ROOT)}: documents {k}, which {schema_file.relative_to(ROOT)} does not accept (add it to the chart)")
        for k in sorted(RESERVED[example.name] & documented_keys):
            failures.append(f"{example.relative_to(ROOT)} documents {k}: render it in the chart now "
                            f"(templates/_helpers.tpl, sb.validate and sb.brokerConfig) and drop it from RESERVED here")


def documented_set(example):
    keys = set(documented(example))
    if example.name == "broker.toml":
        # The [vault] and [aws] tables are documented in their own files.
        for extra in ("vault.toml", "aws.toml"):
            keys |= documented(ROOT / "examples" / extra)
        # [[issuers]] tables (several clusters) take the keys of [identity].
        keys |= {"issuers" + k.removeprefix("identity") for k in keys if k == "identity" or k.startswith("identity.")}
    return keys


def main(argv):
    failures = []
    examples = {n: ROOT / "examples" / n for n in ("broker.toml", "sidecar.toml", "inject.toml")}
    checks = [
        (examples["broker.toml"], sorted(DEPLOY.glob("overlays/*/broker.toml"))),
        (examples["sidecar.toml"], sorted(DEPLOY.glob("examples/*/sidecar.toml"))),
        (examples["inject.toml"], sorted(DEPLOY.glob("components/*/inject.toml"))),
    ]
    n = 0
    for example, configs in checks:
        if not example.exists():
            failures.append(f"{example} is missing")
            continue
        allowed = documented_set(example)
        for cfg in configs:
            n += 1
            check_data(str(cfg.relative_to(ROOT)), tomllib.loads(cfg.read_text()), example, allowed, failures)
    rendered = 0
    for path in argv:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if not isinstance(doc, dict) or doc.get("kind") != "ConfigMap":
                    continue
                for key, text in (doc.get("data") or {}).items():
                    if key in ("broker.toml", "inject.toml"):
                        rendered += 1
                        name = f"{Path(path).name}: ConfigMap/{doc['metadata']['name']} {key}"
                        try:
                            data = tomllib.loads(text)
                        except tomllib.TOMLDecodeError as e:
                            failures.append(f"{name}: not TOML: {e}")
                            continue
                        check_data(name, data, examples[key], documented_set(examples[key]), failures)
    check_schema(examples, failures)
    for f in failures:
        print(f"FAIL {f}")
    print(f"config keys: {n} config files and {rendered} rendered by the chart checked, "
          f"values.schema.json against the examples, {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
