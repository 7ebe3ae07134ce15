#!/usr/bin/env python3
"""Writes broker.json and sidecar.json (Grafana dashboards) next to this file.

The JSON files are committed; edit this script and run it again:

    python3 deploy/dashboards/build.py           # rewrite the JSON files
    python3 deploy/dashboards/build.py --check   # exit 1 when they are stale

Only the metric names in METRICS (the ones the binaries export) are used;
scripts/check-deploy.sh checks that, and parses every query with promtool.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Every metric the dashboards, alerts and canary analysis may use.
METRICS = {
    # broker (ops port /metrics)
    "secrets_broker_calls_total",
    "secrets_broker_call_duration_seconds",
    "secrets_broker_backend_reads_total",
    "secrets_broker_backend_read_duration_seconds",
    "secrets_broker_secrets_served_total",
    "secrets_broker_cache_requests_total",
    "secrets_broker_jwks_refreshes_total",
    "secrets_broker_watch_streams",
    "secrets_broker_revocation_rules",
    "secrets_broker_revocation_view_age_seconds",
    "secrets_broker_leases_issued_total",
    # sidecar (health_listen /metrics)
    "secrets_sidecar_secret_version",
    "secrets_sidecar_secret_lease_remaining_seconds",
    "secrets_sidecar_secret_age_seconds",
    "secrets_sidecar_secret_last_refresh_timestamp_seconds",
    "secrets_sidecar_refresh_failures_total",
    "secrets_sidecar_generation_swaps_total",
    "secrets_sidecar_revoked_secrets",
}

SERVER_ERRORS = "backend_error|keys_unavailable|stale_view"
DS = {"type": "prometheus", "uid": "${datasource}"}


class Board:
    def __init__(self):
        self.panels = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title):
        self._newline()
        self.panels.append({
            "type": "row", "id": self._id(), "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def _place(self, w, h):
        if self.x + w > 24:
            self._newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def add(self, kind, title, targets, *, w=12, h=8, unit=None, description="",
            stack=False, thresholds=None, min_=None, max_=None, instant=False,
            overrides=None, options=None, transformations=None):
        refs = "ABCDEFGH"
        tg = []
        for i, t in enumerate(targets):
            expr, legend = t if isinstance(t, tuple) else (t, "")
            q = {"datasource": DS, "refId": refs[i], "expr": expr,
                 "legendFormat": legend or "__auto", "range": not instant,
                 "instant": instant}
            if kind == "table":
                q["format"] = "table"
            tg.append(q)
        defaults = {}
        if unit:
            defaults["unit"] = unit
        if min_ is not None:
            defaults["min"] = min_
        if max_ is not None:
            defaults["max"] = max_
        if thresholds:
            defaults["thresholds"] = {"mode": "absolute", "steps": [
                {"color": c, "value": v} for v, c in thresholds]}
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                "showPoints": "never", "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            }
            if thresholds:
                defaults["custom"]["thresholdsStyle"] = {"mode": "line"}
        panel = {
            "type": kind, "id": self._id(), "title": title, "description": description,
            "datasource": DS, "gridPos": self._place(w, h), "targets": tg,
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": options or {},
        }
        if kind == "timeseries" and not options:
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)


def variables(metric, *, pod_multi=True, ns_multi=False):
    return [
        {"type": "datasource", "name": "datasource", "label": "Data source",
         "query": "prometheus", "hide": 0, "current": {}},
        {"type": "query", "name": "namespace", "label": "Namespace", "datasource": DS,
         "query": f"label_values({metric}, namespace)",
         "definition": f"label_values({metric}, namespace)",
         "refresh": 2, "sort": 1, "multi": ns_multi, "includeAll": ns_multi,
         "current": {}, "hide": 0},
        {"type": "query", "name": "pod", "label": "Pod", "datasource": DS,
         "query": f'label_values({metric}{{namespace=~"$namespace"}}, pod)',
         "definition": f'label_values({metric}{{namespace=~"$namespace"}}, pod)',
         "refresh": 2, "sort": 1, "multi": pod_multi, "includeAll": True,
         "allValue": ".*", "current": {}, "hide": 0},
    ]


def dashboard(uid, title, description, board, templating, tags):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [],
        "templating": {"list": templating},
        "panels": board.panels,
    }


def broker():
    s = 'namespace="$namespace",pod=~"$pod"'
    b = Board()
    b.row("Overview")
    b.add("stat", "Replicas scraped", [f'count(up{{job="secrets-broker",{s}}} == 1)'],
          w=4, h=4, thresholds=[(None, "red"), (1, "orange"), (2, "green")])
    b.add("stat", "Calls / s", [f"sum(rate(secrets_broker_calls_total{{{s}}}[$__rate_interval]))"],
          w=4, h=4, unit="reqps")
    b.add("stat", "Server-side failures (login + fetch)",
          [f'sum(rate(secrets_broker_calls_total{{{s},action=~"login|fetch",result=~"{SERVER_ERRORS}"}}[$__rate_interval]))'
           f' / sum(rate(secrets_broker_calls_total{{{s},action=~"login|fetch"}}[$__rate_interval]))'],
          w=4, h=4, unit="percentunit",
          thresholds=[(None, "green"), (0.001, "orange"), (0.01, "red")],
          description="backend_error, keys_unavailable and stale_view over all login and fetch calls (the availability SLO: 99.9%).")
    b.add("stat", "Leases issued / s",
          [f"sum(rate(secrets_broker_leases_issued_total{{{s}}}[$__rate_interval]))"], w=4, h=4, unit="reqps")
    b.add("stat", "Watch streams", [f"sum(secrets_broker_watch_streams{{{s}}})"], w=4, h=4)
    b.add("stat", "Revocation rules", [f"max(secrets_broker_revocation_rules{{{s}}})"], w=4, h=4,
          description="Rules in force (every replica holds the same view).")

    b.row("Calls: rate and results")
    b.add("timeseries", "Calls / s by action",
          [(f"sum by (action) (rate(secrets_broker_calls_total{{{s}}}[$__rate_interval]))", "{{action}}")],
          unit="reqps", stack=True)
    b.add("timeseries", "Logins by result",
          [(f'sum by (result) (rate(secrets_broker_calls_total{{{s},action="login"}}[$__rate_interval]))', "{{result}}")],
          unit="reqps", stack=True,
          description="Server-side failures: backend_error, keys_unavailable, stale_view. The others are client errors (bad or expired tokens, denied, revoked).")
    b.add("timeseries", "Fetches by result",
          [(f'sum by (result) (rate(secrets_broker_calls_total{{{s},action="fetch"}}[$__rate_interval]))', "{{result}}")],
          unit="reqps", stack=True)
    b.add("timeseries", "Errors by action and result (everything but ok)",
          [(f'sum by (action, result) (rate(secrets_broker_calls_total{{{s},result!="ok"}}[$__rate_interval]))', "{{action}} {{result}}")],
          unit="reqps", stack=True)
    b.add("timeseries", "Server-side failure ratio by action",
          [(f'sum by (action) (rate(secrets_broker_calls_total{{{s},result=~"{SERVER_ERRORS}"}}[$__rate_interval]))'
            f' / sum by (action) (rate(secrets_broker_calls_total{{{s}}}[$__rate_interval]))', "{{action}}")],
          unit="percentunit", min_=0, thresholds=[(None, "green"), (0.001, "red")])
    b.add("timeseries", "Error-budget burn rate (1h window, SLO 99.9%)",
          [('secrets_broker:calls_server_errors:ratio_rate1h{action=~"login|fetch"} / 0.001', "{{action}} 1h"),
           ('secrets_broker:calls_server_errors:ratio_rate6h{action=~"login|fetch"} / 0.001', "{{action}} 6h")],
          min_=0, thresholds=[(None, "green"), (6, "orange"), (14.4, "red")],
          description="From the recording rules in deploy/alerts (all replicas). 14.4 over 1h (and 5m) pages; 6 over 6h (and 30m) pages.")

    b.row("Latency")
    for action in ("login", "fetch", "renew"):
        b.add("timeseries", f"{action.capitalize()} latency",
              [(f'histogram_quantile({q}, sum by (le) (rate(secrets_broker_call_duration_seconds_bucket{{{s},action="{action}"}}[$__rate_interval])))', f"p{int(q * 100)}")
               for q in (0.5, 0.9, 0.99)],
              w=8, unit="s", min_=0, thresholds=[(None, "green"), (0.256, "red")] if action != "renew" else None,
              description="The latency SLO: 99% of logins and of fetches within 256 ms." if action != "renew" else "")
    b.add("timeseries", "Backend read latency",
          [(f"histogram_quantile({q}, sum by (le, backend) (rate(secrets_broker_backend_read_duration_seconds_bucket{{{s}}}[$__rate_interval])))", f"{{{{backend}}}} p{int(q * 100)}")
           for q in (0.5, 0.99)],
          unit="s", min_=0)
    b.add("timeseries", "Slow calls (over 256 ms) by action",
          [(f'1 - sum by (action) (rate(secrets_broker_call_duration_seconds_bucket{{{s},action=~"login|fetch|renew",le="0.256"}}[$__rate_interval]))'
            f' / sum by (action) (rate(secrets_broker_call_duration_seconds_count{{{s},action=~"login|fetch|renew"}}[$__rate_interval]))', "{{action}}")],
          unit="percentunit", min_=0, thresholds=[(None, "green"), (0.01, "red")])

    b.row("Backends, coalescing and cache")
    b.add("timeseries", "Coalescing ratio (backend reads per secret served)",
          [(f"sum(rate(secrets_broker_backend_reads_total{{{s}}}[$__rate_interval])) / sum(rate(secrets_broker_secrets_served_total{{{s}}}[$__rate_interval]))", "reads / served")],
          w=8, unit="percentunit", min_=0,
          description="backend_reads_total / secrets_served_total: lower is better (one backend read serves many pods).")
    b.add("timeseries", "Cache hit ratio",
          [(f'sum(rate(secrets_broker_cache_requests_total{{{s},result="hit"}}[$__rate_interval])) / sum(rate(secrets_broker_cache_requests_total{{{s}}}[$__rate_interval]))', "hit ratio")],
          w=8, unit="percentunit", min_=0, max_=1)
    b.add("timeseries", "Backend reads and secrets served / s",
          [(f"sum by (backend) (rate(secrets_broker_backend_reads_total{{{s}}}[$__rate_interval]))", "reads {{backend}}"),
           (f"sum(rate(secrets_broker_secrets_served_total{{{s}}}[$__rate_interval]))", "served"),
           (f"sum(rate(secrets_broker_leases_issued_total{{{s}}}[$__rate_interval]))", "leases issued")],
          w=8, unit="reqps")

    b.row("Identity, revocation and watch streams")
    b.add("timeseries", "Revocation view age by replica",
          [(f"secrets_broker_revocation_view_age_seconds{{{s}}}", "{{pod}}")],
          w=8, unit="s", min_=0, thresholds=[(None, "green"), (10, "red")],
          description="Time since the replica last read the revocation rules. Above revocation.max_staleness (10s by default) it refuses to issue (fail closed).")
    b.add("timeseries", "Revocation rules", [(f"secrets_broker_revocation_rules{{{s}}}", "{{pod}}")], w=8, min_=0)
    b.add("timeseries", "Watch streams by replica", [(f"secrets_broker_watch_streams{{{s}}}", "{{pod}}")],
          w=8, min_=0, stack=True)
    b.add("timeseries", "JWKS refreshes by result",
          [(f"sum by (result) (increase(secrets_broker_jwks_refreshes_total{{{s}}}[$__rate_interval]))", "{{result}}")],
          w=8, min_=0, stack=True,
          description="Fetches of the issuer's keys (periodic, and on an unknown kid within the rate limit).")
    b.add("timeseries", "Token refusals",
          [(f'sum by (result) (rate(secrets_broker_calls_total{{{s},result=~"token_invalid|token_expired|keys_unavailable|denied|revoked"}}[$__rate_interval]))', "{{result}}")],
          w=8, unit="reqps", stack=True)
    b.add("timeseries", "Cache lookups / s",
          [(f"sum by (result) (rate(secrets_broker_cache_requests_total{{{s}}}[$__rate_interval]))", "{{result}}")],
          w=8, unit="reqps", stack=True)
    return dashboard(
        "secrets-broker", "secrets-broker",
        "Broker: calls and results, latency, coalescing, cache, revocation view, watch streams.",
        b, variables("secrets_broker_calls_total"), ["secrets-broker"])


def sidecar():
    s = 'namespace=~"$namespace",pod=~"$pod"'
    b = Board()
    b.row("Overview")
    b.add("stat", "Pods with a sidecar",
          [f"count(count by (namespace, pod) (secrets_sidecar_secret_version{{{s}}}))"], w=6, h=4)
    b.add("stat", "Soonest lease end",
          [f"min(secrets_sidecar_secret_lease_remaining_seconds{{{s}}})"], w=6, h=4, unit="s",
          thresholds=[(None, "red"), (60, "orange"), (300, "green")])
    b.add("stat", "Refresh failures (range)",
          [f"sum(increase(secrets_sidecar_refresh_failures_total{{{s}}}[$__range]))"], w=6, h=4,
          thresholds=[(None, "green"), (1, "orange")])
    b.add("stat", "Revoked secrets held back",
          [f"sum(secrets_sidecar_revoked_secrets{{{s}}})"], w=6, h=4,
          thresholds=[(None, "green"), (1, "red")])

    b.row("Leases")
    b.add("table", "Secrets nearest to lease end",
          [f"bottomk(25, secrets_sidecar_secret_lease_remaining_seconds{{{s}}})"],
          w=12, h=10, unit="s", instant=True,
          description="Lease time left per pod and secret, shortest first. A sidecar renews at about 2/3 of the lease.",
          transformations=[
              {"id": "organize", "options": {
                  "excludeByName": {"Time": True, "__name__": True, "job": True, "instance": True,
                                    "container": True, "endpoint": True},
                  "renameByName": {"Value": "lease left"}}},
              {"id": "sortBy", "options": {"sort": [{"field": "lease left"}]}}])
    b.add("timeseries", "Lease remaining",
          [(f"secrets_sidecar_secret_lease_remaining_seconds{{{s}}}", "{{namespace}}/{{pod}} {{secret}}")],
          w=12, h=10, unit="s", min_=0)
    b.add("timeseries", "Time since last refresh",
          [(f"time() - secrets_sidecar_secret_last_refresh_timestamp_seconds{{{s}}}", "{{namespace}}/{{pod}} {{secret}}")],
          unit="s", min_=0)
    b.add("timeseries", "Secret age",
          [(f"secrets_sidecar_secret_age_seconds{{{s}}}", "{{namespace}}/{{pod}} {{secret}}")],
          unit="s", min_=0, description="Age of the secret each pod holds.")

    b.row("Refreshes, swaps and versions")
    b.add("timeseries", "Refresh failures",
          [(f"sum by (namespace, pod) (increase(secrets_sidecar_refresh_failures_total{{{s}}}[$__rate_interval]))", "{{namespace}}/{{pod}}")],
          w=8, min_=0, stack=True,
          description="Failed logins, fetches or renewals; the sidecar retries with capped backoff and keeps serving the last good set until its lease ends.")
    b.add("timeseries", "Generation swaps",
          [(f"sum by (namespace, pod) (increase(secrets_sidecar_generation_swaps_total{{{s}}}[$__rate_interval]))", "{{namespace}}/{{pod}}")],
          w=8, min_=0, stack=True,
          description="Atomic ..data swaps: a rotation, a renewal with new values, or removal after revocation.")
    b.add("timeseries", "Revoked secrets",
          [(f"secrets_sidecar_revoked_secrets{{{s}}} > 0", "{{namespace}}/{{pod}}")], w=8, min_=0)
    b.add("timeseries", "Secret version by pod",
          [(f"secrets_sidecar_secret_version{{{s}}}", "{{namespace}}/{{pod}} {{secret}}")],
          w=12, min_=0, description="After a rotation every pod should reach the new version within seconds.")
    b.add("table", "Pods behind the newest version",
          [f"count by (namespace, secret) (secrets_sidecar_secret_version{{{s}}}"
           f" < on (namespace, secret) group_left () max by (namespace, secret) (secrets_sidecar_secret_version{{{s}}}))"],
          w=12, instant=True,
          transformations=[{"id": "organize", "options": {
              "excludeByName": {"Time": True}, "renameByName": {"Value": "pods behind"}}}])
    return dashboard(
        "secrets-sidecar", "secrets-sidecar",
        "Sidecars: secrets nearest to lease end, refresh failures, generation swaps, versions.",
        b, variables("secrets_sidecar_secret_version", ns_multi=True), ["secrets-broker"])


def render():
    return {
        "broker.json": json.dumps(broker(), indent=2, sort_keys=False) + "\n",
        "sidecar.json": json.dumps(sidecar(), indent=2, sort_keys=False) + "\n",
    }


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, text in render().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run python3 deploy/dashboards/build.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
