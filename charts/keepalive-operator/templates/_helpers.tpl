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

{{/* Whether the cluster serves admissionregistration.k8s.io/v1 MutatingAdmissionPolicy (Kubernetes 1.36+). */}}
{{- define "keepalive.servesAdmissionPolicy" -}}
{{- if .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy" }}true{{ end }}
{{- end }}

{{/* The injection mode, resolved: "webhook" or "admissionPolicy" (injection.mode auto: admissionPolicy where the
cluster serves MutatingAdmissionPolicy v1). */}}
{{- define "keepalive.injectionMode" -}}
{{- $mode := .Values.injection.mode | default "auto" }}
{{- $served := include "keepalive.servesAdmissionPolicy" . }}
{{- if eq $mode "auto" }}
{{- ternary "admissionPolicy" "webhook" (eq $served "true") }}
{{- else if and (eq $mode "admissionPolicy") (ne $served "true") }}
{{- fail "injection.mode is admissionPolicy, but this cluster does not serve admissionregistration.k8s.io/v1 MutatingAdmissionPolicy (Kubernetes 1.36 or newer): set injection.mode to webhook or auto (helm template: add --api-versions admissionregistration.k8s.io/v1/MutatingAdmissionPolicy for such a cluster)" }}
{{- else }}
{{- $mode }}
{{- end }}
{{- end }}

{{/* Name of the MutatingAdmissionPolicy and of its binding, created by the operator in admissionPolicy mode. */}}
{{- define "keepalive.admissionPolicyName" -}}
{{- printf "%s-policies" (include "keepalive.fullname" .) }}
{{- end }}

{{/* Name of the fallback MutatingWebhookConfiguration the operator registers in admissionPolicy mode. */}}
{{- define "keepalive.fallbackWebhookName" -}}
{{- printf "%s-fallback" (include "keepalive.fullname" .) }}
{{- end }}

{{/* The namespaces the webhook and the admission policy never see, as a JSON list: webhook.excludedNamespaces, the
release namespace and the agent's (webhook.excludeReleaseNamespace). */}}
{{- define "keepalive.excludedNamespaces" -}}
{{- $w := .Values.webhook }}
{{- $excluded := $w.excludedNamespaces | default list }}
{{- if and $w.excludeReleaseNamespace (not (has .Release.Namespace $excluded)) }}
{{- $excluded = append $excluded .Release.Namespace }}
{{- end }}
{{- if and $w.excludeReleaseNamespace .Values.agent.enabled (not (has (include "keepalive.agentNamespace" .) $excluded)) }}
{{- $excluded = append $excluded (include "keepalive.agentNamespace" .) }}
{{- end }}
{{- toJson $excluded }}
{{- end }}

{{/* The namespace selector of the webhook and of the admission policy's binding, as JSON: webhook.namespaceSelector
with the exclusions first in its matchExpressions. */}}
{{- define "keepalive.namespaceSelector" -}}
{{- $excluded := include "keepalive.excludedNamespaces" . | fromJsonArray }}
{{- $nsSelector := deepCopy (.Values.webhook.namespaceSelector | default dict) }}
{{- if $excluded }}
{{- $exclusion := dict "key" "kubernetes.io/metadata.name" "operator" "NotIn" "values" $excluded }}
{{- $_ := set $nsSelector "matchExpressions" (prepend ($nsSelector.matchExpressions | default list) $exclusion) }}
{{- end }}
{{- toJson $nsSelector }}
{{- end }}

{{/* The MutatingWebhookConfiguration of the operator's webhook, named .name (context: dict "root" $ "name" name):
rendered by the chart in webhook mode, handed to the operator as its fallback in admissionPolicy mode. No caBundle:
the operator (self-managed certificates) or cert-manager's CA injector sets it. */}}
{{- define "keepalive.mutatingWebhookConfiguration" -}}
{{- $root := .root -}}
{{- $fullname := include "keepalive.fullname" $root -}}
{{- $w := $root.Values.webhook -}}
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: {{ .name }}
  labels:
    {{- include "keepalive.labels" $root | nindent 4 }}
    app.kubernetes.io/component: webhook
  {{- if or $root.Values.certManager.enabled $w.annotations }}
  annotations:
    {{- if $root.Values.certManager.enabled }}
    cert-manager.io/inject-ca-from: {{ printf "%s/%s" $root.Release.Namespace (include "keepalive.certificateName" $root) }}
    {{- end }}
    {{- with $w.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
webhooks:
  - name: pods.keepalive.dev
    admissionReviewVersions: [v1]
    clientConfig:
      {{- if $w.url }}
      url: {{ $w.url | quote }}
      {{- else }}
      service:
        name: {{ $fullname }}
        namespace: {{ $root.Release.Namespace }}
        path: /mutate
        port: {{ $root.Values.service.port }}
      {{- end }}
    rules:
      - operations: [CREATE]
        apiGroups: [""]
        apiVersions: [v1]
        resources: [pods]
        scope: Namespaced
    failurePolicy: {{ $w.failurePolicy }}
    matchPolicy: Equivalent
    sideEffects: None
    timeoutSeconds: {{ $w.timeoutSeconds }}
    reinvocationPolicy: {{ $w.reinvocationPolicy }}
    namespaceSelector:
      {{- include "keepalive.namespaceSelector" $root | fromJson | toYaml | nindent 6 }}
    objectSelector:
      {{- toYaml ($w.objectSelector | default dict) | nindent 6 }}
{{- end }}
