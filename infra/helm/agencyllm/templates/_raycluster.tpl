{{/* The RayService's rayClusterConfig: a head without GPUs and the GPU worker groups. */}}
{{- define "agencyllm.rayClusterConfig" -}}
{{- $root := . -}}
{{- $autoscaling := .Values.ray.autoscaling.enabled -}}
rayVersion: {{ .Values.ray.version | quote }}
enableInTreeAutoscaling: {{ $autoscaling }}
{{- if .Values.ray.auth.enabled }}
authOptions:
  mode: token
  {{- with .Values.ray.auth.existingSecret }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
{{- with .Values.ray.gcsFaultTolerance }}
{{- if .enabled }}
# GCS state in an external Redis: a head restart no longer restarts the workers and engines.
gcsFaultToleranceOptions:
  redisAddress: {{ .redisAddress | quote }}
  {{- if .redisPasswordSecret }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ .redisPasswordSecret }}
        key: {{ .redisPasswordKey }}
  {{- end }}
{{- end }}
{{- end }}
{{- if $autoscaling }}
autoscalerOptions:
  image: {{ include "agencyllm.platformImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  idleTimeoutSeconds: {{ .Values.ray.autoscaling.idleTimeoutSeconds }}
  resources:
    {{- toYaml .Values.ray.autoscaling.resources | nindent 4 }}
  securityContext:
    {{- include "agencyllm.containerSecurityContext" . | nindent 4 }}
  env:
    - name: HOME
      value: /tmp
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- include "agencyllm.autoscalerTokenMount" . | nindent 4 }}
{{- end }}
headGroupSpec:
  rayStartParams:
    num-gpus: "0"
    num-cpus: {{ .Values.ray.head.rayCpus | quote }}
    dashboard-host: "0.0.0.0"
    object-store-memory: {{ include "agencyllm.objectStoreBytes" .Values.ray.head.shmSizeLimit | quote }}
  template:
    metadata:
      labels:
        {{- include "agencyllm.labels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
        agencyllm.io/ray: "true"
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      # The chart's service account, also with autoscaling (KubeRay then binds its autoscaler Role
      # to it instead of creating its own). No container gets a token but the autoscaler sidecar,
      # which mounts a short-lived one (agencyllm.autoscalerTokenVolume).
      serviceAccountName: {{ include "agencyllm.serviceAccountName" . }}
      automountServiceAccountToken: false
      securityContext:
        {{- include "agencyllm.podSecurityContext" . | nindent 8 }}
      {{- include "agencyllm.imagePullSecrets" . | nindent 6 }}
      {{- include "agencyllm.podScheduling" (dict "group" .Values.ray.head "labels" (include "agencyllm.rayGroupLabels" (dict "root" . "group" "") | fromYaml)) | nindent 6 }}
      initContainers:
        {{- include "agencyllm.dbWaitContainer" . | nindent 8 }}
      containers:
        - name: ray-head
          image: {{ include "agencyllm.platformImage" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          env:
            {{- include "agencyllm.env" . | nindent 12 }}
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
            - {name: serve, containerPort: {{ .Values.serve.port }}}
            - {name: metrics, containerPort: 8080}
          resources:
            requests:
              {{- toYaml .Values.ray.head.resources.requests | nindent 14 }}
              {{- include "agencyllm.rayEphemeralStorage" (dict "root" . "tmp" .Values.ray.head.tmpSizeLimit "part" "requests") | nindent 14 }}
            limits:
              {{- toYaml .Values.ray.head.resources.limits | nindent 14 }}
              {{- include "agencyllm.rayEphemeralStorage" (dict "root" . "tmp" .Values.ray.head.tmpSizeLimit "part" "limits") | nindent 14 }}
          securityContext:
            {{- include "agencyllm.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "agencyllm.rayVolumeMounts" . | nindent 12 }}
      volumes:
        {{- include "agencyllm.rayVolumes" (dict "root" . "tmp" .Values.ray.head.tmpSizeLimit "shm" .Values.ray.head.shmSizeLimit) | nindent 8 }}
        {{- include "agencyllm.autoscalerTokenVolume" . | nindent 8 }}
workerGroupSpecs:
{{- range .Values.ray.workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ .replicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    rayStartParams:
      object-store-memory: {{ include "agencyllm.objectStoreBytes" .shmSizeLimit | quote }}
    template:
      metadata:
        labels:
          {{- include "agencyllm.labels" $root | nindent 10 }}
          app.kubernetes.io/component: ray-worker
          agencyllm.io/ray: "true"
          agencyllm.io/worker-group: {{ .name }}
          {{- with $root.Values.podLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- with $root.Values.podAnnotations }}
        annotations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
      spec:
        serviceAccountName: {{ include "agencyllm.serviceAccountName" $root }}
        automountServiceAccountToken: false
        securityContext:
          {{- include "agencyllm.podSecurityContext" $root | nindent 10 }}
        {{- include "agencyllm.imagePullSecrets" $root | nindent 8 }}
        {{- include "agencyllm.podScheduling" (dict "group" . "labels" (include "agencyllm.rayGroupLabels" (dict "root" $root "group" .name) | fromYaml)) | nindent 8 }}
        initContainers:
          {{- include "agencyllm.dbWaitContainer" $root | nindent 10 }}
        containers:
          - name: ray-worker
            image: {{ include "agencyllm.platformImage" $root }}
            imagePullPolicy: {{ $root.Values.image.pullPolicy }}
            env:
              {{- include "agencyllm.env" $root | nindent 14 }}
            ports:
              - {name: serve, containerPort: {{ $root.Values.serve.port }}}
              - {name: metrics, containerPort: 8080}
            resources:
              requests:
                {{- toYaml .resources.requests | nindent 16 }}
                {{- include "agencyllm.rayEphemeralStorage" (dict "root" $root "tmp" .tmpSizeLimit "part" "requests") | nindent 16 }}
                {{- if gt (int .gpus) 0 }}
                nvidia.com/gpu: {{ .gpus | quote }}
                {{- end }}
              limits:
                {{- toYaml .resources.limits | nindent 16 }}
                {{- include "agencyllm.rayEphemeralStorage" (dict "root" $root "tmp" .tmpSizeLimit "part" "limits") | nindent 16 }}
                {{- if gt (int .gpus) 0 }}
                nvidia.com/gpu: {{ .gpus | quote }}
                {{- end }}
            securityContext:
              {{- include "agencyllm.containerSecurityContext" $root | nindent 14 }}
            volumeMounts:
              {{- include "agencyllm.rayVolumeMounts" $root | nindent 14 }}
        volumes:
          {{- include "agencyllm.rayVolumes" (dict "root" $root "tmp" .tmpSizeLimit "shm" .shmSizeLimit) | nindent 10 }}
{{- end }}
{{- end -}}

{{/* Hash of the cluster shape (everything but worker replica counts, which KubeRay scales in
place). With upgrade.strategy Recreate it is part of the RayService name, so a new image or
cluster shape replaces the RayService: Helm deletes the old one, KubeRay its cluster. */}}
{{- define "agencyllm.clusterHash" -}}
{{- $cluster := include "agencyllm.rayClusterConfig" . | fromYaml -}}
{{- range $cluster.workerGroupSpecs -}}
{{- $_ := unset . "replicas" -}}
{{- $_ = unset . "minReplicas" -}}
{{- $_ = unset . "maxReplicas" -}}
{{- end -}}
{{- toJson $cluster | sha256sum | trunc 8 -}}
{{- end -}}

{{/* At most 47 characters, KubeRay's limit (it appends its own suffixes): FULLNAME (<= 40), or
FULLNAME cut to 38 + "-" + HASH8 with Recreate. */}}
{{- define "agencyllm.rayServiceName" -}}
{{- if eq .Values.upgrade.strategy "Recreate" -}}
{{- printf "%s-%s" (regexReplaceAll "-+$" (include "agencyllm.fullname" . | trunc 38) "") (include "agencyllm.clusterHash" .) -}}
{{- else -}}
{{- include "agencyllm.fullname" . -}}
{{- end -}}
{{- end -}}
