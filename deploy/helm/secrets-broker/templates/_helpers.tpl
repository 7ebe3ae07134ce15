{{/* Names. The release `secrets-broker` names everything as deploy/base does. */}}
{{- define "sb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sb.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* app.kubernetes.io/name of the injector's objects. */}}
{{- define "sb.injectorName" -}}
{{- printf "%s-injector" (include "sb.name" .) }}
{{- end }}

{{/*
Labels of every object: include "sb.labels" (dict "ctx" $ "component" "broker")
(optional "name", default the chart's name).
*/}}
{{- define "sb.labels" -}}
{{- $ctx := .ctx -}}
app.kubernetes.io/name: {{ default (include "sb.name" $ctx) .name }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: secrets-broker
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $ctx.Chart.Name $ctx.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "sb.selectorLabels" -}}
{{- $ctx := .ctx -}}
app.kubernetes.io/name: {{ default (include "sb.name" $ctx) .name }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sb.brokerSelector" -}}
{{ include "sb.selectorLabels" (dict "ctx" . "component" "broker") }}
{{- end }}

{{- define "sb.injectorSelector" -}}
{{ include "sb.selectorLabels" (dict "ctx" . "component" "injector" "name" (include "sb.injectorName" .)) }}
{{- end }}

{{/* An image reference: include "sb.image" (dict "image" .Values.image "ctx" $) */}}
{{- define "sb.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "sb.priorityClassName" -}}
{{- default (include "sb.fullname" .) .Values.priorityClass.name }}
{{- end }}

{{- define "sb.tlsSecret" -}}
{{- default (printf "%s-tls" (include "sb.fullname" .)) .Values.broker.tls.secretName }}
{{- end }}

{{- define "sb.auditKeySecret" -}}
{{- default (printf "%s-audit-key" (include "sb.fullname" .)) .Values.broker.audit.keySecretName }}
{{- end }}

{{- define "sb.injectorTLSSecret" -}}
{{- default (printf "%s-injector-tls" (include "sb.fullname" .)) .Values.injector.tls.secretName }}
{{- end }}

{{/* "true" when the broker runs on PostgreSQL (several replicas), else "". */}}
{{- define "sb.postgres" -}}
{{- $url := .Values.broker.config.database.url | default "" }}
{{- if or (hasPrefix "postgres://" $url) (hasPrefix "postgresql://" $url) }}true{{ end }}
{{- end }}

{{/* The checks no schema can express; called by every template that depends on them. */}}
{{- define "sb.validate" -}}
{{- $url := .Values.broker.config.database.url | default "" }}
{{- if include "sb.postgres" . }}
{{- else if hasPrefix "sqlite:///var/lib/secrets-broker/" $url }}
{{- if gt (int .Values.broker.replicas) 1 }}
{{- fail (printf "broker.replicas is %d, but broker.config.database.url is SQLite, which allows one replica: use a postgres:// URL for more (examples/ha.yaml)" (int .Values.broker.replicas)) }}
{{- end }}
{{- if .Values.broker.autoscaling.enabled }}
{{- fail "broker.autoscaling.enabled needs PostgreSQL: broker.config.database.url is SQLite (one replica)" }}
{{- end }}
{{- if .Values.canary.enabled }}
{{- fail "canary.enabled needs PostgreSQL: a canary runs beside the stable replicas, and SQLite allows one (broker.config.database.url)" }}
{{- end }}
{{- else }}
{{- fail (printf "broker.config.database.url %q: use sqlite:///var/lib/secrets-broker/<file> (one replica, on the chart's volume) or postgres://user@host:5432/db (several replicas)" $url) }}
{{- end }}
{{- $audit := default dict .Values.broker.config.audit }}
{{- if and .Values.broker.audit.enabled $audit.retention (ne (toString $audit.retention) "0s") (not $audit.checkpoint_file) }}
{{- fail (printf "broker.config.audit.retention is %v, but broker.config.audit.checkpoint_file is not set: records are pruned only up to an exported checkpoint (set checkpoint_file, \"-\" for standard output)" $audit.retention) }}
{{- end }}
{{- if and .Values.injector.enabled (eq .Values.injector.tls.source "certManager") (not .Values.certManager.enabled) (not .Values.injector.tls.issuerRef.name) }}
{{- fail "injector.tls.source is certManager: set certManager.enabled (the chart's CA signs the webhook's certificate) or injector.tls.issuerRef" }}
{{- end }}
{{- if and .Values.injector.enabled (eq .Values.injector.tls.source "secret") (or (not .Values.injector.tls.caBundle) (not .Values.injector.tls.secretName)) }}
{{- fail "injector.tls.source is secret: set injector.tls.secretName (a kubernetes.io/tls Secret) and injector.tls.caBundle (base64 PEM of its CA)" }}
{{- end }}
{{- end }}

{{/*
TOML from a map: include "sb.toml" (dict "table" $map "path" "").
Scalars and arrays of scalars first, then tables ([path.key]) and arrays of
tables ([[path.key]]), keys sorted; null values are left out. Written here
because Helm's toToml turns every number into a float (8 -> 8.0), which the
broker refuses for integer keys.
*/}}
{{- define "sb.toml" -}}
{{- $t := .table }}
{{- $p := .path }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := index $t $k }}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v) (include "sb.toml.isTableArray" $v)) }}
{{ $k }} = {{ include "sb.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := index $t $k }}
{{- $name := ternary $k (printf "%s.%s" $p $k) (eq $p "") }}
{{- if kindIs "map" $v }}

[{{ $name }}]
{{- include "sb.toml" (dict "table" $v "path" $name) }}
{{- else if include "sb.toml.isTableArray" $v }}
{{- range $e := $v }}

[[{{ $name }}]]
{{- include "sb.toml" (dict "table" $e "path" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sb.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) (kindIs "map" (first .)) }}true{{ end }}
{{- end }}

{{- define "sb.toml.value" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) }}
{{- . }}
{{- else if kindIs "slice" . }}
{{- $out := list }}
{{- range $e := . }}{{ $out = append $out (include "sb.toml.value" $e) }}{{ end }}
{{- printf "[%s]" (join ", " $out) }}
{{- else }}
{{- fail (printf "cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* broker.toml: the values' config plus the keys the manifests decide. */}}
{{- define "sb.brokerConfig" -}}
{{- $cfg := deepCopy .Values.broker.config }}
{{- $server := default dict $cfg.server }}
{{- /* null: the broker's default (30m), not written. */}}
{{- range $k := list "max_connection_age" "max_connection_age_grace" }}
{{- if kindIs "invalid" (get $server $k) }}{{ $_ := unset $server $k }}{{ end }}
{{- end }}
{{- $_ := set $server "listen" "0.0.0.0:8443" }}
{{- $_ = set $server "ops_listen" "0.0.0.0:9090" }}
{{- $_ = set $server "tls_cert_file" "/etc/secrets-broker/tls/tls.crt" }}
{{- $_ = set $server "tls_key_file" "/etc/secrets-broker/tls/tls.key" }}
{{- $_ = set $cfg "server" $server }}
{{- if .Values.broker.admin.enabled }}
{{- $admin := default dict $cfg.admin }}
{{- $_ = set $admin "listen" "0.0.0.0:8444" }}
{{- $_ = set $admin "client_ca_file" "/etc/secrets-broker/admin/clients-ca.crt" }}
{{- $_ = set $cfg "admin" $admin }}
{{- else }}
{{- $_ = unset $cfg "admin" }}
{{- end }}
{{- $store := default dict $cfg.store }}
{{- $_ = set $store "key_file" "/etc/secrets-broker/store/store.key" }}
{{- $_ = set $cfg "store" $store }}
{{- if .Values.broker.audit.enabled }}
{{- $audit := default dict $cfg.audit }}
{{- /* null: not written (no checkpoints; retention: keep every record). */}}
{{- range $k := list "checkpoint_file" "checkpoint_interval" "retention" }}
{{- if kindIs "invalid" (get $audit $k) }}{{ $_ := unset $audit $k }}{{ end }}
{{- end }}
{{- $_ = set $audit "key_file" "/etc/secrets-broker/audit/audit.key" }}
{{- $_ = set $cfg "audit" $audit }}
{{- else }}
{{- $_ = unset $cfg "audit" }}
{{- end }}
{{- include "sb.toml" (dict "table" $cfg "path" "") | trim }}
{{- end }}

{{/* inject.toml: the values' config plus the keys the manifests decide. */}}
{{- define "sb.injectConfig" -}}
{{- $cfg := deepCopy .Values.injector.config }}
{{- $exclude := prepend (default list $cfg.exclude_namespaces) .Release.Namespace | uniq }}
{{- $_ := set $cfg "exclude_namespaces" $exclude }}
{{- $server := default dict $cfg.server }}
{{- $_ = set $server "listen" "0.0.0.0:8443" }}
{{- $_ = set $server "ops_listen" "0.0.0.0:9090" }}
{{- $_ = set $server "tls_cert_file" "/etc/secrets-broker-injector/tls/tls.crt" }}
{{- $_ = set $server "tls_key_file" "/etc/secrets-broker-injector/tls/tls.key" }}
{{- $_ = set $cfg "server" $server }}
{{- $sidecar := default dict $cfg.sidecar }}
{{- $_ = set $sidecar "image" (include "sb.image" (dict "image" .Values.injector.sidecarImage "ctx" .)) }}
{{- $_ = set $sidecar "broker_url" (printf "https://%s.%s.svc:8443" (include "sb.fullname" .) .Release.Namespace) }}
{{- $_ = set $sidecar "broker_ca_file" "/etc/secrets-broker-injector/broker-ca/ca.crt" }}
{{- $_ = set $cfg "sidecar" $sidecar }}
{{- include "sb.toml" (dict "table" $cfg "path" "") | trim }}
{{- end }}

{{/* The restricted container securityContext of deploy/base. */}}
{{- define "sb.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "sb.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
# Mounted Secrets (root:65532, 0440) and the SQLite volume are reachable
# through this group.
fsGroup: 65532
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}
