{{/* Least privilege and names -------------------------------------------------------------------- */}}

{{/* The only Kubernetes API credential in the release: a projected, short-lived service-account
token for the autoscaler sidecar (head pod, ray.autoscaling.enabled). Every pod sets
automountServiceAccountToken: false, so the Ray and ingress containers hold no token; this volume
is mounted into the autoscaler container alone, where Ray's Kubernetes client reads it (token,
ca.crt, namespace), and the kubelet rotates it before it expires (Ray re-reads it every minute). */}}
{{- define "agencyllm.autoscalerTokenVolume" -}}
{{- if .Values.ray.autoscaling.enabled }}
- name: autoscaler-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ .Values.ray.autoscaling.token.expirationSeconds }}
          {{- with .Values.ray.autoscaling.token.audience }}
          audience: {{ . | quote }}
          {{- end }}
      - configMap:
          name: kube-root-ca.crt
          items:
            - {key: ca.crt, path: ca.crt}
      - downwardAPI:
          items:
            - path: namespace
              fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
{{- end }}
{{- end -}}

{{- define "agencyllm.autoscalerTokenMount" -}}
- name: autoscaler-token
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}

{{/* Names KubeRay and Kubernetes accept, for every release name Helm accepts (up to 53 characters
of [a-z0-9.-]). The full name is at most 40 characters and a DNS-1035 label (Services, and
KubeRay's own names, derive from it); with upgrade.strategy Recreate the RayService adds
-HASH8 and stays within KubeRay's 47. Refuses what cannot be fixed by truncation. */}}
{{- define "agencyllm.validateNames" -}}
{{- $full := include "agencyllm.fullname" . -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $full) -}}
{{- fail (printf "the resource name prefix %q is not a DNS-1035 label (KubeRay and Service names must start with a letter and hold only a-z, 0-9 and -): choose a release name that starts with a letter, or set fullnameOverride" $full) -}}
{{- end -}}
{{- if gt (len (include "agencyllm.rayServiceName" .)) 47 -}}
{{- fail (printf "RayService name %q is longer than KubeRay's 47 characters" (include "agencyllm.rayServiceName" .)) -}}
{{- end -}}
{{- end -}}
