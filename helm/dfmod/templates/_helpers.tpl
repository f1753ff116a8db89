{{/* vim: set filetype=mustache: */}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "dfmod.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: RELEASE-NAME unless the release name already contains the chart name.
Truncated to 52 characters so that suffixes such as "-worker-cpu" stay within 63.
*/}}
{{- define "dfmod.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "dfmod.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the release's pods (never change them on upgrade). */}}
{{- define "dfmod.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dfmod.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Common labels of every resource. */}}
{{- define "dfmod.labels" -}}
helm.sh/chart: {{ include "dfmod.chart" . }}
{{ include "dfmod.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dfmod
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component: (dict "root" $ "component" "api"). */}}
{{- define "dfmod.componentLabels" -}}
{{ include "dfmod.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "api"). */}}
{{- define "dfmod.componentSelectorLabels" -}}
{{ include "dfmod.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Name of the ServiceAccount the pods use. */}}
{{- define "dfmod.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dfmod.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: (dict "repository" R "tag" T "digest" D); with a digest, `R:T@D` (pulled by digest). */}}
{{- define "dfmod.imageRef" -}}
{{- $ref := printf "%s:%s" .repository (.tag | toString) -}}
{{- if .digest -}}
{{- $ref = printf "%s@%s" $ref .digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* Image of the API, migrations and tests. */}}
{{- define "dfmod.image" -}}
{{- include "dfmod.imageRef" (dict "repository" .Values.image.repository "tag" (default .Chart.AppVersion .Values.image.tag) "digest" .Values.image.digest) -}}
{{- end -}}

{{/* Image of a worker pool: (dict "root" $ "pool" $poolValues). The top-level digest applies only to a pool
that runs the top-level image unchanged (same repository, no tag or suffix of its own). */}}
{{- define "dfmod.poolImage" -}}
{{- $root := .root -}}
{{- $img := .pool.image | default dict -}}
{{- $repository := default $root.Values.image.repository $img.repository -}}
{{- $tag := $img.tag | default "" | toString -}}
{{- $digest := $img.digest | default "" -}}
{{- $sameImage := and (not $img.repository) (not $tag) (not $img.tagSuffix) -}}
{{- if and (not $digest) $sameImage -}}
{{- $digest = $root.Values.image.digest | default "" -}}
{{- end -}}
{{- if not $tag -}}
{{- $tag = printf "%s%s" (default $root.Chart.AppVersion $root.Values.image.tag | toString) (default "" $img.tagSuffix) -}}
{{- end -}}
{{- include "dfmod.imageRef" (dict "repository" $repository "tag" $tag "digest" $digest) -}}
{{- end -}}

{{/* Name of the Secret holding the credentials (the chart's or secrets.existingSecret). */}}
{{- define "dfmod.secretName" -}}
{{- default (include "dfmod.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* Name of the ConfigMap holding the non-secret settings. */}}
{{- define "dfmod.configMapName" -}}
{{- include "dfmod.fullname" . -}}
{{- end -}}

{{/* Name of the hook-time copies (ServiceAccount, ConfigMap, Secret) used by the migration Job. */}}
{{- define "dfmod.migrateName" -}}
{{- printf "%s-migrate" (include "dfmod.fullname" .) -}}
{{- end -}}

{{/* Queue of a worker pool: (dict "root" $ "pool" $poolValues). */}}
{{- define "dfmod.poolQueue" -}}
{{- default .root.Values.queue .pool.queue -}}
{{- end -}}

{{/*
Queues a worker pool consumes, comma-separated, for `dfmod worker --queues`: (dict "root" $ "name" POOL).
The events pool consumes the events queue only. A classify pool consumes its classify queue only while the
events pool runs, and the events queue as well when it does not, so callbacks are still delivered.
*/}}
{{- define "dfmod.poolQueues" -}}
{{- $values := .root.Values -}}
{{- if eq .name "events" -}}
{{- $values.eventsQueue -}}
{{- else -}}
{{- $classify := include "dfmod.poolQueue" (dict "root" .root "pool" (index $values.workers .name)) -}}
{{- if $values.workers.events.enabled -}}
{{- $classify -}}
{{- else -}}
{{- printf "%s,%s" $classify $values.eventsQueue -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Fail rendering with a clear message when required values are missing or contradict each other.
Included by the always-rendered ConfigMap.
*/}}
{{- define "dfmod.validate" -}}
{{- $s := .Values.secrets -}}
{{- if not $s.existingSecret -}}
{{- if not $s.databaseUrl -}}
{{- fail "dfmod: set secrets.databaseUrl (postgresql+psycopg://USER:PASSWORD@HOST:5432/DB) or secrets.existingSecret (a Secret with the keys DFMOD_DATABASE_URL and DFMOD_BROKER_URL)" -}}
{{- end -}}
{{- if not $s.brokerUrl -}}
{{- fail "dfmod: set secrets.brokerUrl (redis://:PASSWORD@HOST:6379/0) or secrets.existingSecret (a Secret with the keys DFMOD_DATABASE_URL and DFMOD_BROKER_URL)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.keda.enabled (not (include "dfmod.redisAddress" .)) -}}
{{- fail "dfmod: keda.enabled needs keda.redis.address (host:port of the broker's Redis) when secrets.existingSecret is set" -}}
{{- end -}}
{{- if not (or .Values.workers.cpu.enabled .Values.workers.gpu.enabled) -}}
{{- fail "dfmod: enable at least one worker pool (workers.cpu.enabled or workers.gpu.enabled)" -}}
{{- end -}}
{{- if and .Values.keda.enabled (eq .Values.keda.trigger "prometheus") (not .Values.keda.prometheus.serverAddress) -}}
{{- fail "dfmod: keda.trigger=prometheus needs keda.prometheus.serverAddress (the Prometheus that scrapes the API's dfmod_queue_depth)" -}}
{{- end -}}
{{- $tls := .Values.keda.redis.tls -}}
{{- if and (or $tls.certKey $tls.keyKey) (not (and $tls.certKey $tls.keyKey)) -}}
{{- fail "dfmod: keda.redis.tls.certKey and keda.redis.tls.keyKey go together (client certificate and its key)" -}}
{{- end -}}
{{- if .Values.workers.events.queue -}}
{{- fail "dfmod: workers.events.queue is not used: the events pool consumes eventsQueue (set that instead, the API publishes there)" -}}
{{- end -}}
{{- if eq .Values.queue .Values.eventsQueue -}}
{{- fail "dfmod: eventsQueue must differ from queue (callbacks and heatmaps must not queue behind classification)" -}}
{{- end -}}
{{- range $name := list "cpu" "gpu" "events" -}}
{{- $pool := index $.Values.workers $name -}}
{{- if and $pool.enabled $pool.autoscaling.enabled (gt (int $pool.autoscaling.minReplicas) (int $pool.autoscaling.maxReplicas)) -}}
{{- fail (printf "dfmod: workers.%s.autoscaling.minReplicas is above maxReplicas" $name) -}}
{{- end -}}
{{- if and $pool.enabled (gt (int $pool.keda.minReplicaCount) (int $pool.keda.maxReplicaCount)) -}}
{{- fail (printf "dfmod: workers.%s.keda.minReplicaCount is above maxReplicaCount" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Redis host:port KEDA reads the queue from: keda.redis.address, else the host of secrets.brokerUrl. */}}
{{- define "dfmod.redisAddress" -}}
{{- if .Values.keda.redis.address -}}
{{- .Values.keda.redis.address -}}
{{- else if and .Values.secrets.brokerUrl (not .Values.secrets.existingSecret) -}}
{{- $url := urlParse .Values.secrets.brokerUrl -}}
{{- $host := $url.host -}}
{{- if regexMatch ":[0-9]+$" $host -}}
{{- $host -}}
{{- else -}}
{{- printf "%s:6379" $host -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Redis database index of the broker: keda.redis.databaseIndex, else the path of secrets.brokerUrl, else 0. */}}
{{- define "dfmod.redisDatabaseIndex" -}}
{{- if not (kindIs "invalid" .Values.keda.redis.databaseIndex) -}}
{{- .Values.keda.redis.databaseIndex | int -}}
{{- else if and .Values.secrets.brokerUrl (not .Values.secrets.existingSecret) -}}
{{- $path := (urlParse .Values.secrets.brokerUrl).path | trimPrefix "/" -}}
{{- if regexMatch "^[0-9]+$" $path -}}{{ $path }}{{- else -}}0{{- end -}}
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/* Whether KEDA talks TLS to Redis: keda.redis.enableTLS, else true for a rediss:// brokerUrl. */}}
{{- define "dfmod.redisTLS" -}}
{{- if not (kindIs "invalid" .Values.keda.redis.enableTLS) -}}
{{- .Values.keda.redis.enableTLS -}}
{{- else -}}
{{- hasPrefix "rediss://" .Values.secrets.brokerUrl -}}
{{- end -}}
{{- end -}}

{{/* Redis password the chart's Secret stores for KEDA: secrets.redisPassword, else the one in brokerUrl. */}}
{{- define "dfmod.redisPassword" -}}
{{- if .Values.secrets.redisPassword -}}
{{- .Values.secrets.redisPassword -}}
{{- else if .Values.secrets.brokerUrl -}}
{{- $userinfo := (urlParse .Values.secrets.brokerUrl).userinfo | default "" -}}
{{- if contains ":" $userinfo -}}
{{- $userinfo | splitList ":" | rest | join ":" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Redis ACL username in secrets.brokerUrl (redis://USER:PASSWORD@HOST...), if any. */}}
{{- define "dfmod.redisUsername" -}}
{{- if .Values.secrets.brokerUrl -}}
{{- $userinfo := (urlParse .Values.secrets.brokerUrl).userinfo | default "" -}}
{{- if contains ":" $userinfo -}}
{{- $userinfo | splitList ":" | first -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Secret key KEDA reads the Redis username from: keda.redis.usernameKey, or REDIS_USERNAME when the
chart's Secret derives one from brokerUrl; empty for none. */}}
{{- define "dfmod.redisUsernameKey" -}}
{{- if .Values.keda.redis.usernameKey -}}
{{- .Values.keda.redis.usernameKey -}}
{{- else if and (not .Values.secrets.existingSecret) (include "dfmod.redisUsername" .) -}}
REDIS_USERNAME
{{- end -}}
{{- end -}}

{{/* Whether KEDA authenticates to Redis with a password (renders "true" or nothing). */}}
{{- define "dfmod.kedaPasswordAuth" -}}
{{- if .Values.keda.redis.passwordKey -}}
{{- if or .Values.secrets.existingSecret (include "dfmod.redisPassword" .) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether KEDA reads TLS material (CA, client certificate) from a Secret (renders "true" or nothing). */}}
{{- define "dfmod.kedaTLSAuth" -}}
{{- $tls := .Values.keda.redis.tls -}}
{{- if or $tls.caKey $tls.certKey -}}
true
{{- end -}}
{{- end -}}

{{/* Whether the Redis trigger needs a TriggerAuthentication (renders "true" or nothing). */}}
{{- define "dfmod.kedaAuth" -}}
{{- if eq .Values.keda.trigger "redis" -}}
{{- if or (include "dfmod.kedaPasswordAuth" .) (include "dfmod.kedaTLSAuth" .) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Data of the settings ConfigMap (shared by the release's ConfigMap and the migration hook's copy). */}}
{{- define "dfmod.configData" -}}
{{- $c := .Values.config -}}
DFMOD_DATA_DIR: "/var/lib/dfmod"
DFMOD_QUEUE: {{ .Values.queue | quote }}
DFMOD_EVENTS_QUEUE: {{ .Values.eventsQueue | quote }}
DFMOD_S3_REGION: {{ $c.s3Region | quote }}
DFMOD_S3_ADDRESSING_STYLE: {{ $c.s3AddressingStyle | quote }}
DFMOD_MAX_UPLOAD_BYTES: {{ $c.maxUploadBytes | int64 | quote }}
DFMOD_VISIBILITY_TIMEOUT_S: {{ $c.visibilityTimeoutS | int64 | quote }}
DFMOD_STUCK_AFTER_S: {{ $c.stuckAfterS | int64 | quote }}
DFMOD_DATABASE_POOL_SIZE: {{ $c.databasePoolSize | int64 | quote }}
{{- with $c.storageUrl }}
DFMOD_STORAGE_URL: {{ . | quote }}
{{- end }}
{{- with $c.allowedBuckets }}
DFMOD_ALLOWED_BUCKETS: {{ join "," . | quote }}
{{- end }}
{{- with $c.s3EndpointUrl }}
DFMOD_S3_ENDPOINT_URL: {{ . | quote }}
{{- end }}
{{- with $c.checkpoint }}
DFMOD_CHECKPOINT: {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" $c.threshold) }}
DFMOD_THRESHOLD: {{ $c.threshold | toString | quote }}
{{- end }}
{{- range $key, $value := $c.extra }}
{{- if or (has $key (include "dfmod.optionalSecretKeys" $ | fromJsonArray)) (has $key (list "DFMOD_DATABASE_URL" "DFMOD_BROKER_URL")) }}
{{- fail (printf "dfmod: %s is a secret: set it under secrets (the chart's Secret or secrets.existingSecret), never config.extra (a ConfigMap)" $key) }}
{{- end }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Secret keys every dfmod pod may read from the Secret, each optional (DFMOD_DATABASE_URL and
DFMOD_BROKER_URL are required and mapped on their own). */}}
{{- define "dfmod.optionalSecretKeys" -}}
{{- list "DFMOD_S3_ACCESS_KEY_ID" "DFMOD_S3_SECRET_ACCESS_KEY" "DFMOD_S3_EVENT_TOKEN" "DFMOD_CALLBACK_SECRET" "DFMOD_SECRET_KEY" | toJson -}}
{{- end -}}

{{/*
Env variables with the credentials: (dict "root" $ "secretName" NAME). Database and broker URLs are
required keys; the S3 keys and the event token are optional ones.
*/}}
{{- define "dfmod.secretEnv" -}}
{{- $name := .secretName -}}
- name: DFMOD_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: DFMOD_DATABASE_URL
- name: DFMOD_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: DFMOD_BROKER_URL
{{- range $key := include "dfmod.optionalSecretKeys" $.root | fromJsonArray }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end -}}

{{/* Env of the writable locations on a read-only root filesystem. */}}
{{- define "dfmod.scratchEnv" -}}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end -}}

{{/* Volumes every dfmod pod has: writable /tmp and data dir on a read-only root filesystem. */}}
{{- define "dfmod.volumes" -}}
- name: tmp
  emptyDir:
    {{- with .Values.scratchSizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: data
  emptyDir:
    {{- with .Values.scratchSizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volume mounts matching dfmod.volumes. */}}
{{- define "dfmod.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/dfmod
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Prometheus scrape annotations: (dict "root" $ "port" 9100 "path" "/metrics"). */}}
{{- define "dfmod.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | int | quote }}
prometheus.io/path: {{ .path | quote }}
{{- end -}}
{{- end -}}
