{{/* Names, labels and the operator's RBAC rules, shared by the templates. */}}

{{- define "kubetrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetrain.fullname" -}}
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

{{- define "kubetrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of everything the chart makes. */}}
{{- define "kubetrain.labels" -}}
helm.sh/chart: {{ include "kubetrain.chart" . }}
app.kubernetes.io/name: {{ include "kubetrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetrain
{{- end }}

{{/*
The operator's pods. The component keeps them apart from trainer pods, which also carry
app.kubernetes.io/name=kubetrain (with the run's name as instance).
*/}}
{{- define "kubetrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetrain.operatorLabels" -}}
{{ include "kubetrain.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Trainer pods, as the operator renders them (kubetrain.render.run_labels). */}}
{{- define "kubetrain.trainerSelectorLabels" -}}
app.kubernetes.io/name: kubetrain
app.kubernetes.io/component: trainer
{{- end }}

{{- define "kubetrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetrain.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when the replicas coordinate through kopf peering, else empty. */}}
{{- define "kubetrain.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "kubetrain.peeringName" -}}
{{- default (include "kubetrain.fullname" .) .Values.peering.name }}
{{- end }}

{{/* Namespaces that get a trainer NetworkPolicy. */}}
{{- define "kubetrain.networkPolicyNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson $namespaces }}
{{- end }}

{{/*
Rules for namespaced resources: exactly the calls in kubetrain/k8s.py, plus what kopf
itself does with the resources it serves (list, watch, patch for finalizers and its
annotations) and the events it posts. tests/chart/test_rbac.py derives the same set from
the code and fails when the two differ, in either direction.
*/}}
{{- define "kubetrain.namespacedRules" -}}
# Serve TrainingRuns: kopf lists, watches and patches them; the reconcile reads one and
# annotates it; the status goes through the status subresource. Pipelines create their
# stages' runs and Sweeps their trials, list them by label and set their spec.suspend.
- apiGroups: [kubetrain.dev]
  resources: [trainingruns]
  verbs: [get, list, watch, create, patch]
- apiGroups: [kubetrain.dev]
  resources: [trainingruns/status]
  verbs: [patch]
# The children's ownerReferences set blockOwnerDeletion (the garbage collector deletes them
# before a run deleted in the foreground is gone); OwnerReferencesPermissionEnforcement
# admits that only from someone who may update the owner's finalizers.
- apiGroups: [kubetrain.dev]
  resources: [trainingruns/finalizers]
  verbs: [update]
# Serve Pipelines the same way (their stage runs are listed by label, above).
- apiGroups: [kubetrain.dev]
  resources: [pipelines]
  verbs: [get, list, watch, patch]
- apiGroups: [kubetrain.dev]
  resources: [pipelines/status]
  verbs: [patch]
# Serve Sweeps the same way. A Pipeline's sweep stages are Sweeps it creates, lists by label
# and suspends (spec.suspend), as it does with its TrainingRun stages.
- apiGroups: [kubetrain.dev]
  resources: [sweeps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [kubetrain.dev]
  resources: [sweeps/status]
  verbs: [patch]
# Each attempt's children: a ConfigMap with the trainer's config (brought up to date when
# it differs), a headless Service, and an Indexed Job or a JobSet, deleted on restart. They
# and the pods are listed and watched (one informer per kind for all runs); a ConfigMap or
# Service whose name is taken is read by name to learn who holds it.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, delete]
- apiGroups: [jobset.x-k8s.io]
  resources: [jobsets]
  verbs: [list, watch, create, delete]
# Follow the pods of an attempt (rank 0's /metrics is read over HTTP, no extra rights);
# force-delete an old attempt's pods stuck on a dead node when restartPolicy says so.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, delete]
# Wait until the claims a run mounts exist and can be shared by its nodes. No Secrets: a
# missing one is learnt from the pods' status (CreateContainerConfigError).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [list, watch]
# The operator posts the objects' events (kubectl describe tr).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if and (include "kubetrain.peering" .) .Values.watchNamespaces }}
# kopf peering between replicas, one KopfPeering per watched namespace (read by the runs'
# workers too: only the active replica visits runs).
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}

{{/* Rules for cluster-scoped resources, always in a ClusterRole. */}}
{{- define "kubetrain.clusterRules" -}}
# kopf discovers the resources it serves, and notices CRDs installed later.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.watchNamespaces }}
# kopf follows the watched namespaces being created and deleted.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- else if include "kubetrain.peering" . }}
# kopf peering between replicas through one ClusterKopfPeering (read by the runs' workers
# too: only the active replica visits runs).
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
