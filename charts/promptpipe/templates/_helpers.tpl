{{/* The release's full name, cut to a DNS label. */}}
{{- define "promptpipe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "promptpipe.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "promptpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "promptpipe.serviceAccountName" -}}
{{- default (include "promptpipe.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "promptpipe.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The quota store's own: it must not fall under the operator's selectors (its Deployment, Service). */}}
{{- define "promptpipe.storeSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-quota-store
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "promptpipe.storeLabels" -}}
{{ include "promptpipe.storeSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
