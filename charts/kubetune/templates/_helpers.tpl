{{/* Chart name. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the metrics Service; also the `job` label Prometheus gives the operator's series. */}}
{{- define "kubetune.metricsServiceName" -}}
{{- printf "%s-metrics" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* image reference from {repository, tag, digest} and a default tag. */}}
{{- define "kubetune.imageRef" -}}
{{- $image := index . 0 }}
{{- $defaultTag := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $defaultTag $image.tag) }}
{{- end }}
{{- end }}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.imageRef" (list .Values.image .Chart.AppVersion) }}
{{- end }}

{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.imageRef" (list .Values.trainer.image .Chart.AppVersion) }}
{{- end }}

{{/*
Tenant namespaces (a JSON list): those carrying every label of tenants.namespaceSelector.matchLabels, less
tenants.excludedNamespaces and namespaces being deleted. Helm `lookup` reads them when the release is installed or
upgraded; `helm template` and `helm lint` find none.
*/}}
{{- define "kubetune.tenantNamespaces" -}}
{{- $selector := .Values.tenants.namespaceSelector.matchLabels | default dict }}
{{- $found := list }}
{{- range (lookup "v1" "Namespace" "" "").items }}
{{- $labels := .metadata.labels | default dict }}
{{- $selected := not (has .metadata.name $.Values.tenants.excludedNamespaces) }}
{{- range $key, $value := $selector }}
{{- if not (and (hasKey $labels $key) (eq (get $labels $key) (toString $value))) }}
{{- $selected = false }}
{{- end }}
{{- end }}
{{- if and $selected (ne (dig "status" "phase" "" .) "Terminating") }}
{{- $found = append $found .metadata.name }}
{{- end }}
{{- end }}
{{- toJson (sortAlpha $found) }}
{{- end }}

{{/*
The namespaces this release serves (a JSON list, never empty): watchNamespaces if set, else the tenant namespaces,
else the release namespace alone. The one source of the operator's --namespace arguments, its Roles and
RoleBindings, the PodMonitor's namespaces and the admission policy binding's namespaces.
*/}}
{{- define "kubetune.servedNamespaces" -}}
{{- $served := .Values.watchNamespaces | default (include "kubetune.tenantNamespaces" . | fromJsonArray) }}
{{- toJson ($served | default (list .Release.Namespace)) }}
{{- end }}

{{/* A map of labels as `kubectl label` takes them: k=v,k2=v2 (sorted by key). */}}
{{- define "kubetune.labelPairs" -}}
{{- $pairs := list }}
{{- range $key, $value := . }}
{{- $pairs = append $pairs (printf "%s=%s" $key (toString $value)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* The tenant label selector as `kubectl label` takes it: k=v,k2=v2. */}}
{{- define "kubetune.tenantLabels" -}}
{{- $pairs := list }}
{{- range $key, $value := .Values.tenants.namespaceSelector.matchLabels }}
{{- $pairs = append $pairs (printf "%s=%s" $key (toString $value)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* Namespaces whose trainer pods the PodMonitor scrapes. */}}
{{- define "kubetune.podMonitorNamespaces" -}}
{{- toJson (.Values.podMonitor.namespaces | default (include "kubetune.servedNamespaces" . | fromJsonArray)) }}
{{- end }}

{{/* Name of the ValidatingAdmissionPolicy and of its binding. */}}
{{- define "kubetune.policyName" -}}
{{- printf "%s-finetunejobs" (include "kubetune.fullname" .) }}
{{- end }}

{{/* Name of the policy's parameters ConfigMap (release namespace). */}}
{{- define "kubetune.policyParamsName" -}}
{{- printf "%s-policy" (include "kubetune.fullname" .) }}
{{- end }}

{{/* Allowed image prefixes, comma-separated: policy.allowedImagePrefixes, or the trainer image's repository. */}}
{{- define "kubetune.imagePrefixes" -}}
{{- join "," (.Values.policy.allowedImagePrefixes | default (list .Values.trainer.image.repository)) }}
{{- end }}

{{/*
RBAC rules on namespaced resources, in a Role per served namespace (never cluster-wide).
Exactly the calls the operator makes: docs/operator.md, section RBAC (a test keeps the two equal).
*/}}
{{- define "kubetune.namespacedRules" -}}
# created: a FineTuneSweep's trials; patched: kopf's annotations and finalizer, a pruned trial's suspend
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# children carry blockOwnerDeletion owner references
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# FineTuneSweeps: watched and read; their status patched; their trials carry blockOwnerDeletion owner references.
# `trial` (RBAC only): the admission policy admits a sweep's trials created with it (docs/security.md)
- apiGroups: ["kubetune.io"]
  resources: ["finetunesweeps"]
  verbs: ["get", "list", "watch", "trial"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunesweeps/status"]
  verbs: ["patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunesweeps/finalizers"]
  verbs: ["update"]
# children: created, patched and watched (kopf indexes them by their FineTuneJob)
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create"]
# finished validation Jobs and failed ones before a retry are deleted
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Kueue's Workloads (spec.scheduling.queueName): watched (kopf indexes them); spec.active and an annotation patched
# to deactivate/reactivate one, never the Job's spec.suspend, which Kueue owns
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch", "patch"]
# each job's NetworkPolicy: watched (kopf indexes it), created with the training Job when networkPolicy.enabled;
# the garbage collector deletes it with its FineTuneJob
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch"{{ if .Values.networkPolicy.enabled }}, "create"{{ end }}]
{{- end }}

{{/* The leader election's Lease, in the release namespace */}}
{{- define "kubetune.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (printf "%s-operator" (include "kubetune.fullname" .)) }}
{{- end }}
