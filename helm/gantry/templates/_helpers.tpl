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

{{/*
Labels. Each key is emitted by exactly one helper, and a labels mapping includes exactly one
of "gantry.labels" or "gantry.componentLabels": YAML forbids a key twice in one mapping, and
`helm install` refuses such a manifest.
*/}}

{{/* The release's selector labels: which chart, which release. */}}
{{- define "gantry.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component (coordinator or worker): the release's, and the component. */}}
{{- define "gantry.selector" -}}
{{ include "gantry.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Common labels of every object: the release's selector labels and the chart's metadata. */}}
{{- define "gantry.labels" -}}
{{ include "gantry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
Labels of one component's objects and pods: the common labels and the component, so a
superset of "gantry.selector" for that component (its Service and StatefulSet select the pods).
*/}}
{{- define "gantry.componentLabels" -}}
{{ include "gantry.labels" .root }}
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

{{/* The Secret holding the admin and join tokens: the user's, or the chart's own. */}}
{{- define "gantry.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "gantry.fullname" .)) -}}
{{- end }}

{{/* The Secret holding the coordinator's certificate, key and CA. */}}
{{- define "gantry.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "gantry.fullname" .)) -}}
{{- end }}
