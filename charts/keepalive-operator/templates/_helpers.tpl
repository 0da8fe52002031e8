{{/* Chart name, at most 63 characters. */}}
{{- define "keepalive.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, with the chart name unless it already contains it. */}}
{{- define "keepalive.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "keepalive.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "keepalive.labels" -}}
helm.sh/chart: {{ include "keepalive.chart" . }}
app.kubernetes.io/name: {{ include "keepalive.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator's pods. */}}
{{- define "keepalive.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keepalive.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector labels of the agent's pods. */}}
{{- define "keepalive.agentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "keepalive.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "keepalive.serviceAccountName" -}}
{{- default (include "keepalive.fullname" .) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "keepalive.agentServiceAccountName" -}}
{{- default (printf "%s-agent" (include "keepalive.fullname" .)) .Values.agent.serviceAccount.name }}
{{- end }}

{{- define "keepalive.leaseName" -}}
{{- default (include "keepalive.fullname" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* The Secret with the webhook's serving certificate: written by the operator, or by cert-manager. */}}
{{- define "keepalive.tlsSecretName" -}}
{{- printf "%s-webhook-tls" (include "keepalive.fullname" .) }}
{{- end }}

{{- define "keepalive.certificateName" -}}
{{- printf "%s-webhook" (include "keepalive.fullname" .) }}
{{- end }}

{{- define "keepalive.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The agent's namespace: agent.namespace, else "<release namespace>-agent". */}}
{{- define "keepalive.agentNamespace" -}}
{{- $ns := default (printf "%s-agent" .Release.Namespace) .Values.agent.namespace }}
{{- if gt (len $ns) 63 }}
{{- fail (printf "the agent's namespace %q is longer than 63 characters: set agent.namespace" $ns) }}
{{- end }}
{{- if and (eq $ns .Release.Namespace) .Values.agent.createNamespace }}
{{- fail "agent.namespace is the release namespace, which Helm cannot create: set agent.createNamespace=false (the release namespace must then allow Pod Security privileged) or choose another namespace" }}
{{- end }}
{{- $ns }}
{{- end }}

{{/* The user name of the agent's ServiceAccount, as the apiserver authenticates its tokens. */}}
{{- define "keepalive.agentUsername" -}}
{{- printf "system:serviceaccount:%s:%s" (include "keepalive.agentNamespace" .) (include "keepalive.agentServiceAccountName" .) }}
{{- end }}
