{{- define "csi-interposer.fullname" -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}-csi-interposer{{- end }}
{{- define "csi-interposer.labels" -}}
app.kubernetes.io/name: csi-interposer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}
{{- define "csi-interposer.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{- end }}
{{- define "csi-interposer.pluginDir" -}}{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}{{- end }}
{{- define "csi-interposer.otlpEndpoint" -}}
{{- if .Values.tracing.otlpEndpoint -}}{{ .Values.tracing.otlpEndpoint }}
{{- else if .Values.jaeger.enabled -}}http://{{ include "csi-interposer.fullname" . }}-jaeger.{{ .Release.Namespace }}.svc:4317
{{- end -}}
{{- end }}
