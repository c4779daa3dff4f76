{{/* Scheduling and disk of the chart's pods ------------------------------------------------------ */}}

{{/* Where and with what priority a pod runs: priority class, runtime class (`nvidia` on GPU-operator
clusters on k3s/RKE2), node selector, tolerations, affinity, topology spread. A spread constraint
without a labelSelector gets the pod's own group labels, so it spreads the pods of that group.
Usage: include "agencyllm.podScheduling" (dict "group" .Values.ray.head "labels" (dict ...)) */}}
{{- define "agencyllm.podScheduling" -}}
{{- with .group.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .group.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $labels := .labels }}
{{- with .group.topologySpreadConstraints }}
{{- $constraints := list }}
{{- range . }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" $labels) }}
{{- end }}
{{- $constraints = append $constraints $constraint }}
{{- end }}
topologySpreadConstraints:
  {{- toYaml $constraints | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Labels that pick the pods of one Ray group. Usage: include "agencyllm.rayGroupLabels"
(dict "root" $ "group" "NAME") with NAME empty for the head. */}}
{{- define "agencyllm.rayGroupLabels" -}}
{{ include "agencyllm.selectorLabels" .root }}
{{- if .group }}
app.kubernetes.io/component: ray-worker
agencyllm.io/worker-group: {{ .group }}
{{- else }}
app.kubernetes.io/component: ray-head
{{- end }}
{{- end -}}

{{/* Byte count of a Kubernetes quantity with a binary suffix ("50Gi"). */}}
{{- define "agencyllm.quantityBytes" -}}
{{- $number := regexFind "^[0-9]+" . -}}
{{- $unit := trimPrefix $number . -}}
{{- mul (int64 $number) (get (dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776) $unit) -}}
{{- end -}}

{{/* Ephemeral storage of a Ray container, which owns the pod's /tmp emptyDir: the request is the
/tmp size limit (the scheduler reserves that much node disk), the limit adds
ray.ephemeralStorageOverhead for container logs and the writable layer. Usage: include
"agencyllm.rayEphemeralStorage" (dict "root" $ "tmp" "50Gi" "part" "requests") */}}
{{- define "agencyllm.rayEphemeralStorage" -}}
{{- if eq .part "requests" -}}
ephemeral-storage: {{ .tmp }}
{{- else -}}
{{- $bytes := add (include "agencyllm.quantityBytes" .tmp | int64) (include "agencyllm.quantityBytes" .root.Values.ray.ephemeralStorageOverhead | int64) -}}
{{- if eq (mod $bytes 1073741824) 0 -}}
ephemeral-storage: {{ printf "%dGi" (div $bytes 1073741824) }}
{{- else if eq (mod $bytes 1048576) 0 -}}
ephemeral-storage: {{ printf "%dMi" (div $bytes 1048576) }}
{{- else -}}
ephemeral-storage: {{ printf "%d" $bytes | quote }}
{{- end -}}
{{- end -}}
{{- end -}}
