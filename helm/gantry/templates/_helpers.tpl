{{/* The release's full name, at most 63 characters. */}}
{{- define "gantry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gantry.coordinator" -}}
{{- printf "%s-coordinator" (include "gantry.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gantry.workers" -}}
{{- printf "%s-worker" (include "gantry.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gantry.serviceAccountName" -}}
{{- default (include "gantry.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "gantry.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (coordinator or worker). */}}
{{- define "gantry.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image of a component; `suffix` is appended to the tag (the CUDA variant). */}}
{{- define "gantry.image" -}}
{{- $image := .root.Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s%s" $image.repository $image.tag (default "" .suffix) -}}
{{- end -}}
{{- end -}}

{{/* Pod-level hardening shared by both components. */}}
{{- define "gantry.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gantry.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Scanners flag an image pinned by tag; say why when no digest is set. */}}
{{- define "gantry.digestSkip" -}}
{{- if not .Values.image.digest }}
checkov.io/skip1: CKV_K8S_43=pinned by tag; set image.digest to pin by digest
{{- end -}}
{{- end -}}
