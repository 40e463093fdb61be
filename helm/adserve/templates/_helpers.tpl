{{/*
Helpers. Per-service templates are called with a context dict:
  root: the chart's root context ($), name: the services key (e.g. "ranker"),
  svc:  .Values.services.<name>
*/}}

{{- define "adserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-adserve, or just <release> if it already contains the chart name. */}}
{{- define "adserve.fullname" -}}
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

{{/* Name of one service's Deployment, Service and ConfigMap, e.g. adserve-ranker. */}}
{{- define "adserve.componentName" -}}
{{- printf "%s-%s" (include "adserve.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "adserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "adserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "adserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "adserve.labels" -}}
helm.sh/chart: {{ include "adserve.chart" .root }}
{{ include "adserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: adserve
{{- end }}

{{/* Image reference: services.<name>.image overrides global.image. */}}
{{- define "adserve.image" -}}
{{- $g := .root.Values.global.image -}}
{{- $i := .svc.image | default dict -}}
{{- $repo := $i.repository | default (printf "%s%s" $g.repositoryPrefix .name) -}}
{{- $tag := $i.tag | default $g.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" $repo (toString $tag) }}
{{- end }}

{{- define "adserve.imagePullPolicy" -}}
{{- $i := .svc.image | default dict -}}
{{- $i.pullPolicy | default .root.Values.global.image.pullPolicy }}
{{- end }}

{{/* gRPC URL of another service of this release: (dict "root" $ "name" "ranker"). */}}
{{- define "adserve.upstreamUrl" -}}
{{- $svc := index .root.Values.services .name -}}
{{- printf "%s://%s:%d" (ternary "https" "http" .root.Values.tls.enabled) (include "adserve.componentName" .) (int $svc.ports.grpc) }}
{{- end }}

{{/* Where the TLS Secret is mounted in every pod (tls.enabled). */}}
{{- define "adserve.tlsDir" -}}/etc/adserve/tls{{- end }}

{{/* The label-joiner's output volume claim name. */}}
{{- define "adserve.labelJoinerClaim" -}}
{{- $p := .svc.persistence -}}
{{- $p.existingClaim | default (printf "%s-data" (include "adserve.componentName" .)) }}
{{- end }}

{{/* Resources, plus the GPU limit when svc.gpu.enabled. */}}
{{- define "adserve.resources" -}}
{{- $res := deepCopy (.svc.resources | default dict) -}}
{{- if and .svc.gpu .svc.gpu.enabled -}}
{{- $limits := $res.limits | default dict -}}
{{- $_ := set $limits .svc.gpu.resourceName (int .svc.gpu.count) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res }}
{{- end }}

{{/* The Secret holding the PostgreSQL URL (key: adserve.postgresSecretKey):
postgres.existingSecret, or the chart's own, made from postgres.url. */}}
{{- define "adserve.postgresSecret" -}}
{{- .Values.postgres.existingSecret | default (printf "%s-postgres" (include "adserve.fullname" .)) }}
{{- end }}

{{- define "adserve.postgresSecretKey" -}}
{{- if .Values.postgres.existingSecret }}{{ .Values.postgres.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The Secret holding the gateway's click token keys (key "keys", a TOML
list of hex or base64 keys): clickTokens.existingSecret or the chart's own. */}}
{{- define "adserve.clickTokenSecret" -}}
{{- if .Values.clickTokens.existingSecret }}{{ .Values.clickTokens.existingSecret }}
{{- else }}{{ printf "%s-click-tokens" (include "adserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* The pods' ServiceAccount. */}}
{{- define "adserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "adserve.fullname" .) }}
{{- else }}{{ .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* The Secret holding static DynamoDB keys: dynamodb.existingSecret, the
chart's own when dynamodb.accessKeyId is set, or empty (the SDK's default
chain, e.g. IRSA, is not wired yet: static keys or none). */}}
{{- define "adserve.dynamodbSecret" -}}
{{- if .Values.dynamodb.existingSecret }}{{ .Values.dynamodb.existingSecret }}
{{- else if .Values.dynamodb.accessKeyId }}{{ printf "%s-dynamodb" (include "adserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* [kafka] table (gateway, label-joiner, ...). The gateway's publish
timeout is its own (services.gateway.config.publishTimeoutMs): it is the
impression log's share of every request's budget. */}}
{{- define "adserve.kafkaToml" -}}
{{- $k := .root.Values.kafka -}}
{{- $timeout := $k.publishTimeoutMs -}}
{{- if and (eq .name "gateway") .svc.config.publishTimeoutMs }}{{ $timeout = .svc.config.publishTimeoutMs }}{{ end -}}
[{{ .kafkaTable | default "kafka" }}]
brokers = {{ $k.brokers | toJson }}
publish_timeout = "{{ int64 $timeout }}ms"
partitions = {{ int64 $k.partitions }}
replication = {{ int64 $k.replication }}
{{- end }}

{{/*
config.toml of one service. Keys and tables follow the services' src/config.rs
and crates/adserve-core (ServerConfig, TelemetryConfig). Top-level keys
come before the first [table]. Strings are emitted with toJson, which is also
a valid TOML basic string; integers go through int64 (Helm reads YAML numbers
as floats, which would print as 1.8e+06).
*/}}
{{- define "adserve.configToml" -}}
{{- $v := .root.Values -}}
{{- $c := .svc.config | default dict -}}
# adserve-{{ .name }} configuration, generated by the adserve Helm chart.
# ADSERVE_* environment variables override these keys.
{{- if eq .name "gateway" }}
http_addr = {{ printf "0.0.0.0:%d" (int .svc.ports.http) | toJson }}
frequency_cap_per_day = {{ int64 $c.frequencyCapPerDay }}
fallback_pctr_feature = {{ $c.fallbackPctrFeature | toJson }}
max_body_bytes = {{ int64 $c.maxBodyBytes }}
body_timeout = "{{ int64 $c.bodyTimeoutMs }}ms"
{{- else if eq .name "feature-service" }}
max_ads = {{ int64 $c.maxAds }}
{{- if not (has $c.mode (list "serve" "aggregate" "both")) }}
{{- fail (printf "services.feature-service.config.mode must be serve, aggregate or both, got %q" (toString $c.mode)) }}
{{- end }}
mode = {{ $c.mode | toJson }}
{{- $at := $c.adTable }}
{{- $br := $c.breaker }}
{{- if or (le (int64 $at.refreshMs) 0) (le (int64 $at.maxAgeMs) 0) (le (int64 $br.failures) 0) (le (int64 $br.cooldownMs) 0) }}
{{- fail "services.feature-service.config.adTable.refreshMs, .maxAgeMs, .breaker.failures and .breaker.cooldownMs must be > 0" }}
{{- end }}

[ad_table]
enabled = {{ $at.enabled }}
refresh = "{{ int64 $at.refreshMs }}ms"
max_age = "{{ int64 $at.maxAgeMs }}ms"

{{- $uc := $c.userCache }}
{{- if or (lt (int64 $uc.ttlMs) 0) (gt (int64 $uc.ttlMs) 3600000) (lt (int64 $uc.capacity) 16) }}
{{- fail "services.feature-service.config.userCache.ttlMs must be 0..=3600000 and .capacity >= 16" }}
{{- end }}

[user_cache]
ttl = "{{ int64 $uc.ttlMs }}ms"
capacity = {{ int64 $uc.capacity }}

[breaker]
failures = {{ int64 $br.failures }}
cooldown = "{{ int64 $br.cooldownMs }}ms"
{{- else if eq .name "ranker" }}
max_rows = {{ int64 $c.maxRows }}
{{- with $c.onnxruntimeDylib }}
onnxruntime_dylib = {{ . | toJson }}
{{- end }}
{{- else if eq .name "label-joiner" }}
group_id = {{ $c.groupId | toJson }}
output_dir = {{ $c.outputDir | toJson }}
{{- with $c.outputUrl }}
{{- if not (hasPrefix "s3://" .) }}
{{- fail "services.label-joiner.config.outputUrl must be s3://bucket/prefix" }}
{{- end }}
output_url = {{ . | toJson }}
{{- end }}
{{- if not (kindIs "invalid" $c.labelWindowMs) }}
{{- if le (int64 $c.labelWindowMs) 0 }}
{{- fail "services.label-joiner.config.labelWindowMs must be > 0 (null: the registry's window)" }}
{{- end }}
label_window = "{{ int64 $c.labelWindowMs }}ms"
{{- end }}
flush_interval = "{{ int64 $c.flushIntervalMs }}ms"
max_rows_per_file = {{ int64 $c.maxRowsPerFile }}
allowed_lateness = "{{ int64 $c.allowedLatenessMs }}ms"
mode = {{ $c.mode | toJson }}
negative_keep_rate = {{ $c.negativeKeepRate }}
max_orphan_clicks = {{ int64 $c.maxOrphanClicks }}
memory_budget_bytes = {{ int64 $c.memoryBudgetBytes }}
{{- if $c.outputUrl }}

[s3]
endpoint = {{ $c.s3.endpoint | default "" | toJson }}
region = {{ $c.s3.region | default "" | toJson }}
allow_http = false
{{- end }}
{{- end }}

[server]
grpc_addr = {{ printf "0.0.0.0:%d" (int .svc.ports.grpc) | toJson }}
metrics_addr = {{ printf "0.0.0.0:%d" (int .svc.ports.metrics) | toJson }}
readiness_drain = "{{ int64 $v.readinessDrainMs }}ms"
shutdown_grace = "{{ int64 $v.shutdownGraceMs }}ms"
reflection = {{ $v.grpcReflection }}
{{- if $v.tls.enabled }}
{{- if not $v.tls.secretName }}
{{- fail "tls.secretName must name a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) when tls.enabled" }}
{{- end }}

[server.tls]
cert = "{{ include "adserve.tlsDir" . }}/tls.crt"
key = "{{ include "adserve.tlsDir" . }}/tls.key"
{{- if $v.tls.mutual }}
client_ca = "{{ include "adserve.tlsDir" . }}/ca.crt"
{{- end }}
{{- end }}

[telemetry]
log_filter = {{ $v.telemetry.logFilter | toJson }}
log_json = {{ $v.telemetry.logJson }}
otlp_endpoint = {{ $v.telemetry.otlpEndpoint | default "" | toJson }}
trace_sample_ratio = {{ float64 $v.telemetry.traceSampleRatio }}
{{- if eq .name "gateway" }}
{{- $up := $c.upstreams | default dict }}
{{- $d := $c.deadlines }}

[postgres]
# url: from Secret {{ include "adserve.postgresSecret" .root }} (ADSERVE_POSTGRES__URL), never this file
schema = {{ $v.postgres.schema | toJson }}
max_connections = {{ int64 $v.postgres.maxConnections }}
timeout = "{{ int64 $v.postgres.timeoutMs }}ms"
migrate = {{ $v.postgres.migrate }}
{{- $ci := $c.catalogIndex }}

[catalog_index]
enabled = {{ $ci.enabled }}
refresh = "{{ int64 $ci.refreshMs }}ms"
debounce = "{{ int64 $ci.debounceMs }}ms"
max_staleness = "{{ int64 $ci.maxStalenessMs }}ms"
{{- $pc := $c.predictionCache }}

[prediction_cache]
enabled = {{ $pc.enabled }}
ttl = "{{ int64 $pc.ttlMs }}ms"
max_entries = {{ int64 $pc.maxEntries }}
mantissa_bits = {{ int64 $pc.mantissaBits }}
refresh = "{{ int64 $pc.refreshMs }}ms"
shadow_share = {{ float64 $pc.shadowShare }}

{{ include "adserve.kafkaToml" . }}

[upstreams]
feature_service = {{ $up.featureService | default (include "adserve.upstreamUrl" (dict "root" .root "name" "feature-service")) | toJson }}
ranker = {{ $up.ranker | default (include "adserve.upstreamUrl" (dict "root" .root "name" "ranker")) | toJson }}
auction = {{ $up.auction | default (include "adserve.upstreamUrl" (dict "root" .root "name" "auction")) | toJson }}
{{- if $v.tls.enabled }}

[upstreams.tls]
ca = "{{ include "adserve.tlsDir" . }}/ca.crt"
{{- if $v.tls.mutual }}
cert = "{{ include "adserve.tlsDir" . }}/tls.crt"
key = "{{ include "adserve.tlsDir" . }}/tls.key"
{{- end }}
{{- end }}

[deadlines]
request = "{{ int64 $d.requestMs }}ms"
catalog = "{{ int64 $d.catalogMs }}ms"
features = "{{ int64 $d.featuresMs }}ms"
ranker = "{{ int64 $d.rankerMs }}ms"
auction = "{{ int64 $d.auctionMs }}ms"
{{- $rt := $c.retrieval }}

[retrieval]
max_candidates = {{ int64 $rt.maxCandidates }}
per_campaign = {{ int64 $rt.perCampaign }}
per_advertiser = {{ int64 $rt.perAdvertiser }}
{{- $a := $c.auction }}

[auction]
reserve_ecpm_micros = {{ int64 $a.reserveEcpmMicros }}
quality_exponent = {{ float64 $a.qualityExponent }}
max_per_advertiser = {{ int64 $a.maxPerAdvertiser }}
exploration_share = {{ float64 $a.explorationShare }}
{{- with $a.objective }}

[auction.objective]
pctr_weight = {{ float64 .pctrWeight }}
pcvr_weight = {{ float64 .pcvrWeight }}
ecpm_weight = {{ float64 .ecpmWeight }}
{{- end }}

[counters]
url = {{ $v.redis.url | toJson }}
timeout = "{{ int64 $v.redis.timeoutMs }}ms"
{{- $p := $c.pacing }}

[pacing]
enabled = {{ $p.enabled }}
interval = "{{ int64 $p.intervalMs }}ms"
max_staleness = "{{ int64 $p.maxStalenessMs }}ms"
min_rate = {{ float64 $p.minRate }}
max_step = {{ float64 $p.maxStep }}
memory = {{ float64 $p.memory }}
spend_lag = "{{ int64 $p.spendLagMs }}ms"
hourly_traffic = {{ $p.hourlyTraffic | toJson }}
{{- with $c.clickFilter }}

[click_filter]
enabled = {{ .enabled }}
{{- with .userAgents }}
user_agents = {{ . | toJson }}
{{- end }}
{{- end }}
{{- $o := $c.openrtb }}

[openrtb]
seat = {{ $o.seat | toJson }}
currency = {{ $o.currency | toJson }}
default_placement = {{ $o.defaultPlacement | toJson }}
network_allowance = "{{ int64 $o.networkAllowanceMs }}ms"
click_url = {{ $o.clickUrl | default "" | toJson }}
billing_url = {{ $o.billingUrl | default "" | toJson }}
max_body_bytes = {{ int64 $o.maxBodyBytes }}
{{- with $o.placements }}

[openrtb.placements]
{{- range $tag, $placement := . }}
{{ $tag | toJson }} = {{ $placement | toJson }}
{{- end }}
{{- end }}
{{- range $c.apiKeys }}

[[auth.api_keys]]
publisher = {{ .publisher | toJson }}
sha256 = {{ .sha256 | toJson }}
requests_per_second = {{ int64 .requestsPerSecond }}
burst = {{ int64 .burst }}
{{- end }}
{{- else if eq .name "feature-service" }}

[redis]
url = {{ $v.redis.url | toJson }}
timeout = "{{ int64 $v.redis.timeoutMs }}ms"

[dynamodb]
endpoint = {{ $v.dynamodb.endpoint | default "" | toJson }}
region = {{ $v.dynamodb.region | toJson }}
{{- with include "adserve.dynamodbSecret" .root }}
credentials = "static"
# access_key_id / secret_access_key: from Secret {{ . }}, never this file
{{- else }}
# No static keys: the AWS SDK's default chain (EKS IRSA through
# serviceAccount.annotations, an ECS task role, an instance profile).
credentials = "default_chain"
access_key_id = ""
secret_access_key = ""
{{- end }}
timeout = "{{ int64 $v.dynamodb.timeoutMs }}ms"
{{- if ne $c.mode "serve" }}
{{- $ag := $c.aggregates }}

[aggregates]
group_id = {{ $ag.groupId | toJson }}
allowed_lateness = "{{ int64 $ag.allowedLatenessMs }}ms"
click_wait = "{{ int64 $ag.clickWaitMs }}ms"
refresh_interval = "{{ int64 $ag.refreshIntervalMs }}ms"

{{ include "adserve.kafkaToml" (merge (dict "kafkaTable" "aggregates.kafka") .) }}
{{- end }}
{{- else if eq .name "ranker" }}
{{- $m := $c.model }}
{{- range $m.executionProviders }}
{{- if not (has . (list "cpu" "cuda" "tensorrt")) }}
{{- fail (printf "services.ranker.config.model.executionProviders: each must be cpu, cuda or tensorrt, got %q" (toString .)) }}
{{- end }}
{{- end }}
{{- $b := $c.batching }}

[model]
dir = {{ $m.dir | toJson }}
execution_providers = {{ $m.executionProviders | toJson }}
device_id = {{ int64 $m.deviceId }}
intra_threads = {{ int64 $m.intraThreads }}

[model.tensorrt]
fp16 = {{ $m.tensorrt.fp16 }}
{{- with $m.tensorrt.engineCacheDir }}
engine_cache_dir = {{ . | toJson }}
{{- end }}

[batching]
sessions = {{ int64 $b.sessions }}
max_batch_rows = {{ int64 $b.maxBatchRows }}
max_queue_delay = "{{ int64 $b.maxQueueDelayUs }}us"
max_queue_rows = {{ int64 $b.maxQueueRows }}
predict_misses = {{ $b.predictMisses }}
{{- $r := $c.registry }}

[registry]
enabled = {{ $r.enabled }}
model_name = {{ $r.modelName | toJson }}
poll_interval = "{{ int64 $r.pollIntervalMs }}ms"
keep_previous = "{{ int64 $r.keepPreviousSeconds }}s"
load_timeout = "{{ int64 $r.loadTimeoutSeconds }}s"

[shadow]
enabled = {{ $c.shadow.enabled }}
max_in_flight = {{ int64 $c.shadow.maxInFlight }}
sample_share = {{ $c.shadow.sampleShare | float64 }}
{{- $f := $c.fallback }}

[fallback]
enabled = {{ $f.enabled }}
reserve = "{{ int64 $f.reserveMs }}ms"
{{- with $f.modelDir }}
model_dir = {{ . | toJson }}
{{- end }}
{{- with $f.priorFeature }}
prior_feature = {{ . | toJson }}
{{- end }}

{{ include "adserve.kafkaToml" . }}

[registry.postgres]
# url: from Secret {{ include "adserve.postgresSecret" .root }} (ADSERVE_REGISTRY__POSTGRES__URL), never this file
schema = {{ $r.schema | toJson }}
migrate = {{ $v.postgres.migrate }}
{{- else if eq .name "label-joiner" }}

{{ include "adserve.kafkaToml" . }}
{{- end }}
{{- end }}
