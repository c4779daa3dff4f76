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
      {{- if $autoscaling }}
      # The autoscaler sidecar calls the Kubernetes API with the service account KubeRay creates.
      automountServiceAccountToken: true
      {{- else }}
      serviceAccountName: {{ include "agencyllm.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- end }}
      securityContext:
        {{- include "agencyllm.podSecurityContext" . | nindent 8 }}
      {{- include "agencyllm.imagePullSecrets" . | nindent 6 }}
      {{- with .Values.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
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
            {{- toYaml .Values.ray.head.resources | nindent 12 }}
          securityContext:
            {{- include "agencyllm.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "agencyllm.rayVolumeMounts" . | nindent 12 }}
      volumes:
        {{- include "agencyllm.rayVolumes" (dict "root" . "tmp" .Values.ray.head.tmpSizeLimit "shm" .Values.ray.head.shmSizeLimit) | nindent 8 }}
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
        {{- with .nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
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
                {{- if gt (int .gpus) 0 }}
                nvidia.com/gpu: {{ .gpus | quote }}
                {{- end }}
              limits:
                {{- toYaml .resources.limits | nindent 16 }}
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

{{- define "agencyllm.rayServiceName" -}}
{{- if eq .Values.upgrade.strategy "Recreate" -}}
{{- printf "%s-%s" (include "agencyllm.fullname" .) (include "agencyllm.clusterHash" .) -}}
{{- else -}}
{{- include "agencyllm.fullname" . -}}
{{- end -}}
{{- end -}}
