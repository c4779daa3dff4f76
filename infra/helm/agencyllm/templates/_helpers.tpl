{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "agencyllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RELEASE-agencyllm, or the release name when it already contains the chart name. Kept to 40
characters: KubeRay derives longer names (cluster, head service) from it. Dots, which Helm allows
in release names, become dashes (Service and KubeRay names are DNS-1035 labels); the rest is
checked by agencyllm.validateNames. */}}
{{- define "agencyllm.fullname" -}}
{{- $full := .Values.fullnameOverride -}}
{{- if not $full -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- $release := .Release.Name | replace "." "-" -}}
{{- $full = ternary $release (printf "%s-%s" $release $name) (contains $name $release) -}}
{{- end -}}
{{- regexReplaceAll "-+$" ($full | trunc 40) "" -}}
{{- end -}}

{{- define "agencyllm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agencyllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agencyllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agencyllm.labels" -}}
helm.sh/chart: {{ include "agencyllm.chart" . }}
{{ include "agencyllm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agencyllm
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "agencyllm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "agencyllm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Staff chat (Open WebUI) ------------------------------------------------------------------- */}}

{{- define "agencyllm.chatName" -}}
{{- printf "%s-chat" (include "agencyllm.fullname" .) -}}
{{- end -}}

{{- define "agencyllm.chatSelectorLabels" -}}
{{ include "agencyllm.selectorLabels" . }}
app.kubernetes.io/component: chat
{{- end -}}

{{/* The realm's client Open WebUI signs people in with (infra/keycloak/agencyllm-realm.json;
agencyllm.serving.ops.chat_env.OPEN_WEBUI_CLIENT_ID). */}}
{{- define "agencyllm.chatClientId" -}}open-webui{{- end -}}

{{/* chat.publicUrl without its trailing slash (validate.yaml requires it with chat.enabled). */}}
{{- define "agencyllm.chatPublicUrl" -}}
{{- .Values.chat.publicUrl | trimSuffix "/" -}}
{{- end -}}

{{/* The host name of chat.publicUrl, for the chat's Ingress or HTTPRoute. */}}
{{- define "agencyllm.chatHost" -}}
{{- (urlParse (include "agencyllm.chatPublicUrl" .)).hostname -}}
{{- end -}}

{{/* Selects the release's pods but Open WebUI's (its own NetworkPolicy says what it may reach):
podSelector of the release-wide policies. Usage: include "agencyllm.releasePodSelector" . */}}
{{- define "agencyllm.releasePodSelector" -}}
matchLabels:
  {{- include "agencyllm.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: NotIn, values: [chat]}
{{- end -}}

{{/* Images ----------------------------------------------------------------------------------- */}}

{{/* REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@DIGEST; global.imageRegistry wins.
Usage: include "agencyllm.image" (dict "image" .Values.image "global" .Values.global) */}}
{{- define "agencyllm.image" -}}
{{- $registry := .image.registry -}}
{{- if .global.imageRegistry -}}
{{- $registry = .global.imageRegistry -}}
{{- end -}}
{{- $ref := printf "%s/%s" ($registry | trimSuffix "/") .image.repository -}}
{{- if not $registry -}}
{{- $ref = .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $ref .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (required "an image tag or digest is required" .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "agencyllm.platformImage" -}}
{{- include "agencyllm.image" (dict "image" .Values.image "global" .Values.global) -}}
{{- end -}}

{{- define "agencyllm.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Database ----------------------------------------------------------------------------------- */}}

{{- define "agencyllm.cnpgName" -}}
{{- printf "%s-pg" (include "agencyllm.fullname" .) -}}
{{- end -}}

{{- define "agencyllm.databaseSecretName" -}}
{{- if .Values.database.cloudnativepg.enabled -}}
{{- printf "%s-app" (include "agencyllm.cnpgName" .) -}}
{{- else -}}
{{- required "database.existingSecret is required (a Secret holding the Postgres URL)" .Values.database.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "agencyllm.databaseSecretKey" -}}
{{- if .Values.database.cloudnativepg.enabled -}}uri{{- else -}}{{ .Values.database.secretKey }}{{- end -}}
{{- end -}}

{{/* Pod pieces --------------------------------------------------------------------------------- */}}

{{- define "agencyllm.caPath" -}}/etc/agencyllm/ca/{{ .Values.caBundle.key }}{{- end -}}

{{/* Environment of every platform container: settings, secrets by reference, offline switches. */}}
{{- define "agencyllm.env" -}}
- name: AGENCYLLM_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "agencyllm.databaseSecretName" . }}
      key: {{ include "agencyllm.databaseSecretKey" . }}
- name: AGENCYLLM_DATA_DIR
  value: /tmp/agencyllm
- name: AGENCYLLM_INGRESS_REPLICAS
  value: {{ .Values.config.ingressReplicas | quote }}
- name: AGENCYLLM_QUOTA_TIMEZONE
  value: {{ .Values.config.quotaTimezone | quote }}
- name: AGENCYLLM_RESERVATION_LEASE_SECONDS
  value: {{ .Values.config.reservationLeaseSeconds | quote }}
- name: AGENCYLLM_MAX_REQUEST_BYTES
  value: {{ .Values.config.maxRequestBytes | int64 | quote }}
- name: AGENCYLLM_CORS_ORIGINS
  value: {{ .Values.config.corsOrigins | toJson | quote }}
- name: AGENCYLLM_ACCESS_LOG
  value: {{ .Values.config.accessLog | quote }}
{{- if not (kindIs "invalid" .Values.config.ingressCpus) }}
- name: AGENCYLLM_INGRESS_CPUS
  value: {{ .Values.config.ingressCpus | quote }}
{{- end }}
{{- if .Values.oidc.issuer }}
- name: AGENCYLLM_OIDC_ISSUER
  value: {{ .Values.oidc.issuer | quote }}
- name: AGENCYLLM_OIDC_AUDIENCE
  value: {{ .Values.oidc.audience | quote }}
- name: AGENCYLLM_OIDC_TENANT_CLAIM
  value: {{ .Values.oidc.tenantClaim | quote }}
- name: AGENCYLLM_ROLE_USER
  value: {{ .Values.oidc.roles.user | quote }}
- name: AGENCYLLM_ROLE_TENANT_ADMIN
  value: {{ .Values.oidc.roles.tenantAdmin | quote }}
- name: AGENCYLLM_ROLE_PLATFORM_ADMIN
  value: {{ .Values.oidc.roles.platformAdmin | quote }}
{{- with .Values.oidc.directory.existingSecret }}
# The realm's directory: who a front end's (Open WebUI's) forwarded person is. Unset: front-end
# keys are refused.
- name: AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID
  value: {{ $.Values.oidc.directory.clientId | quote }}
- name: AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: client-secret
{{- end }}
{{- end }}
{{- with .Values.console.publicUrl }}
- name: AGENCYLLM_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.console.existingSecret }}
- name: AGENCYLLM_CONSOLE_SESSION_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: session-secret
- name: AGENCYLLM_CONSOLE_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: client-secret
      optional: true
{{- end }}
{{- with .Values.metrics.tokenSecret }}
- name: AGENCYLLM_METRICS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: token
{{- end }}
{{- if .Values.caBundle.configMap }}
- name: SSL_CERT_FILE
  value: {{ include "agencyllm.caPath" . }}
- name: REQUESTS_CA_BUNDLE
  value: {{ include "agencyllm.caPath" . }}
{{- end }}
# Air gap: nothing phones home, nothing is downloaded.
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
# Read-only root filesystem: every cache lives on the /tmp emptyDir.
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
{{- with .Values.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "agencyllm.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "agencyllm.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end -}}

{{- define "agencyllm.caVolume" -}}
{{- if .Values.caBundle.configMap }}
- name: ca-bundle
  configMap:
    name: {{ .Values.caBundle.configMap }}
    items:
      - key: {{ .Values.caBundle.key }}
        path: {{ .Values.caBundle.key }}
{{- end }}
{{- end -}}

{{- define "agencyllm.caVolumeMount" -}}
{{- if .Values.caBundle.configMap }}
- name: ca-bundle
  mountPath: /etc/agencyllm/ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes of a Ray pod. Usage: include "agencyllm.rayVolumes" (dict "root" $ "tmp" "10Gi" "shm" "2Gi") */}}
{{- define "agencyllm.rayVolumes" -}}
- name: weights
  persistentVolumeClaim:
    claimName: {{ required "weights.existingClaim is required (a PVC holding the model weights)" .root.Values.weights.existingClaim }}
    readOnly: true
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmp }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- include "agencyllm.caVolume" .root }}
{{- end -}}

{{- define "agencyllm.rayVolumeMounts" -}}
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  {{- with .Values.weights.subPath }}
  subPath: {{ . }}
  {{- end }}
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- include "agencyllm.caVolumeMount" . }}
{{- end -}}

{{/* Init container of every Ray pod: Ray starts only once the schema is current. */}}
{{- define "agencyllm.dbWaitContainer" -}}
- name: db-wait
  image: {{ include "agencyllm.platformImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["agencyllm", "db", "wait", "--timeout", {{ .Values.migrations.waitTimeoutSeconds | quote }}]
  env:
    {{- include "agencyllm.env" . | nindent 4 }}
  resources:
    {{- toYaml .Values.migrations.resources | nindent 4 }}
  securityContext:
    {{- include "agencyllm.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- include "agencyllm.caVolumeMount" . | nindent 4 }}
{{- end -}}

{{/* Serve config (serveConfigV2) ------------------------------------------------------------------ */}}

{{/* The models list with each path (weights, chat template) resolved under weights.mountPath. */}}
{{- define "agencyllm.serveModels" -}}
{{- $mount := .Values.weights.mountPath | trimSuffix "/" -}}
{{- $models := list -}}
{{- range .Values.models -}}
{{- $model := deepCopy . -}}
{{- if not (hasPrefix "/" $model.path) -}}
{{- $_ := set $model "path" (printf "%s/%s" $mount $model.path) -}}
{{- end -}}
{{- if and $model.chat_template (not (hasPrefix "/" $model.chat_template)) -}}
{{- $_ := set $model "chat_template" (printf "%s/%s" $mount $model.chat_template) -}}
{{- end -}}
{{- $models = append $models $model -}}
{{- end -}}
{{- toJson $models -}}
{{- end -}}

{{- define "agencyllm.serveConfig" -}}
{{- $models := include "agencyllm.serveModels" . | fromJsonArray -}}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" (int .Values.serve.port))
  "logging_config" (dict "enable_access_log" .Values.config.accessLog)
  "applications" (list (dict
    "name" "agencyllm"
    "route_prefix" "/"
    "import_path" "agencyllm.serving.rayserve.app:build_app"
    "args" (dict "models" $models)))
-}}
{{- toYaml $config -}}
{{- end -}}

{{- define "agencyllm.migrateContainer" -}}
- name: db-upgrade
  image: {{ include "agencyllm.platformImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["agencyllm", "db", "upgrade"]
  env:
    {{- include "agencyllm.env" . | nindent 4 }}
  resources:
    {{- toYaml .Values.migrations.resources | nindent 4 }}
  securityContext:
    {{- include "agencyllm.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- include "agencyllm.caVolumeMount" . | nindent 4 }}
{{- end -}}

{{/* Ray's object store lives in /dev/shm: size it to 80% of that emptyDir (Ray's default, 30% of
the pod's memory, can exceed it and would then fall back to the slow /tmp). Usage: include
"agencyllm.objectStoreBytes" "16Gi" */}}
{{- define "agencyllm.objectStoreBytes" -}}
{{- $number := regexFind "^[0-9]+" . -}}
{{- $unit := trimPrefix $number . -}}
{{- $multiplier := get (dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776) $unit -}}
{{- div (mul (int64 $number) $multiplier 4) 5 -}}
{{- end -}}
