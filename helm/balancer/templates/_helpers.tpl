{{/*
Names are cut to 63 characters: Kubernetes names and label values are DNS labels.
*/}}
{{- define "balancer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "balancer.fullname" -}}
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

{{/*
The full name with a suffix, still within 63 characters.
*/}}
{{- define "balancer.suffixed" -}}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "balancer.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "balancer.configMapName" -}}
{{- include "balancer.suffixed" (list . "config") }}
{{- end }}

{{- define "balancer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: immutable in a Deployment's selector, so they never include the version.
*/}}
{{- define "balancer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "balancer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object: the pod labels plus helm.sh/chart.
*/}}
{{- define "balancer.labels" -}}
helm.sh/chart: {{ include "balancer.chart" . }}
{{ include "balancer.podLabels" . }}
{{- end }}

{{/*
Labels of the pod template: the selector labels, version, ownership and commonLabels, but not
helm.sh/chart, so that a chart bump alone does not roll the pods.
*/}}
{{- define "balancer.podLabels" -}}
{{ include "balancer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: balancer
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The service account balancer runs as: the chart's in gateway mode, the workload's in sidecar
mode (then it must be named).
*/}}
{{- define "balancer.serviceAccountName" -}}
{{- if eq .Values.mode "sidecar" }}
{{- required "sidecar mode: set serviceAccount.name to the service account of the workload that runs the balancer sidecar" .Values.serviceAccount.name }}
{{- else if .Values.serviceAccount.create }}
{{- default (include "balancer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.create is false: set serviceAccount.name to an existing service account (the chart does not fall back to `default`, which other workloads share and which would be granted EndpointSlice access)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: [registry/]repository, then `:tag` (the appVersion when empty) and
`@digest` when set; with both, the tag is informative and the digest is what is pulled. A
digest alone drops the tag, which would only mislead.
*/}}
{{- define "balancer.image" -}}
{{- $image := .Values.image }}
{{- $ref := $image.repository }}
{{- with $image.registry }}{{ $ref = printf "%s/%s" (trimSuffix "/" .) $ref }}{{ end }}
{{- if not $image.digest }}
{{- printf "%s:%s" $ref (default .Chart.AppVersion $image.tag) }}
{{- else if $image.tag }}
{{- printf "%s:%s@%s" $ref $image.tag $image.digest }}
{{- else }}
{{- printf "%s@%s" $ref $image.digest }}
{{- end }}
{{- end }}

{{/*
The container's environment besides the sidecar's listen addresses: the zone preference
(`zonePreference`), then `env`, then `extraEnv`. A zone variable the user sets in `env` or
`extraEnv` wins.
*/}}
{{- define "balancer.env" -}}
{{- $user := concat (.Values.env | default list) (.Values.extraEnv | default list) }}
{{- toYaml (concat (include "balancer.zoneEnv" (dict "root" . "user" $user) | fromYamlArray) $user) }}
{{- end }}

{{/*
BALANCER_ROUTING_PREFER_ZONE and BALANCER_ROUTING_ZONE when `zonePreference.enabled`: the zone
as given, else the pod's topology.kubernetes.io/zone label (downward API). Call with (dict
"root" $ "user" the user's variables); names the user sets are left to them.
*/}}
{{- define "balancer.zoneEnv" -}}
{{- $named := list }}
{{- range .user }}{{ $named = append $named .name }}{{ end }}
{{- $env := list }}
{{- $zone := .root.Values.zonePreference | default dict }}
{{- if $zone.enabled }}
{{- if not (has "BALANCER_ROUTING_PREFER_ZONE" $named) }}
{{- $env = append $env (dict "name" "BALANCER_ROUTING_PREFER_ZONE" "value" "true") }}
{{- end }}
{{- if not (has "BALANCER_ROUTING_ZONE" $named) }}
{{- if $zone.zone }}
{{- $env = append $env (dict "name" "BALANCER_ROUTING_ZONE" "value" $zone.zone) }}
{{- else }}
{{- $label := dict "fieldPath" "metadata.labels['topology.kubernetes.io/zone']" }}
{{- $env = append $env (dict "name" "BALANCER_ROUTING_ZONE" "valueFrom" (dict "fieldRef" $label)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{- define "balancer.port" -}}
{{- (.Values.config.server | default dict).port | default 8080 | int }}
{{- end }}

{{- define "balancer.adminPort" -}}
{{- (.Values.config.server | default dict).admin_port | default 9090 | int }}
{{- end }}

{{/*
The namespaces whose EndpointSlices the pools watch, as a JSON list (sorted, unique); a pool
without a namespace watches balancer's own, the release namespace.
*/}}
{{- define "balancer.watchedNamespaces" -}}
{{- $namespaces := list }}
{{- range .Values.config.pools | default list }}
{{- if .kubernetes }}
{{- $namespaces = append $namespaces (default $.Release.Namespace .kubernetes.namespace) }}
{{- end }}
{{- end }}
{{- $namespaces | uniq | sortAlpha | toJson }}
{{- end }}

{{/*
"true" when balancer needs a service-account token: a pool discovers endpoints from a Service
and no kubeconfig file is configured.
*/}}
{{- define "balancer.needsToken" -}}
{{- $kubeconfig := (.Values.config.kubernetes | default dict).kubeconfig }}
{{- if and (ne (include "balancer.watchedNamespaces" .) "[]") (not $kubeconfig) }}true{{ end }}
{{- end }}

{{/*
Seconds balancer may spend draining after SIGTERM: config.drain.delay (still accepting while
/readyz fails) + config.drain.timeout (in-flight requests finishing). The fallbacks are
balancer's own defaults (a test keeps them in step with balancer.config.DrainSettings).
*/}}
{{- define "balancer.drainSeconds" -}}
{{- $drain := .Values.config.drain | default dict }}
{{- $delay := 5.0 }}
{{- if hasKey $drain "delay" }}{{ $delay = $drain.delay }}{{ end }}
{{- $timeout := 120.0 }}
{{- if hasKey $drain "timeout" }}{{ $timeout = $drain.timeout }}{{ end }}
{{- addf $delay $timeout | ceil | int }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the value if set (refused when shorter than the preStop sleep
plus the drain, as SIGKILL would cut streams that balancer means to finish); else that sum
plus 10 s. Call with (dict "root" $ "preStop" seconds).
*/}}
{{- define "balancer.gracePeriod" -}}
{{- $root := .root }}
{{- $needed := add (int .preStop) (include "balancer.drainSeconds" $root | int) }}
{{- with $root.Values.terminationGracePeriodSeconds }}
{{- if lt (int .) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + config.drain.delay + config.drain.timeout (%d)" (int .) (int $needed)) }}
{{- end }}
{{- int . }}
{{- else }}
{{- add $needed 10 }}
{{- end }}
{{- end }}

{{/*
The sidecar's listen addresses, as BALANCER_* variables (they override the file): the proxy on
sidecar.host (loopback by default: the app beside it is its only client), the admin port on
config.server.admin_host, else config.server.host, else 0.0.0.0, so the kubelet's probes and
Prometheus still reach it on the pod's address. A variable the user sets in `env` wins.
*/}}
{{- define "balancer.sidecar.env" -}}
{{- $server := .Values.config.server | default dict }}
{{- $named := list }}
{{- $user := include "balancer.env" . | fromYamlArray }}
{{- range $user }}{{ $named = append $named .name }}{{ end }}
{{- $env := list }}
{{- if and .Values.sidecar.host (not (has "BALANCER_SERVER_HOST" $named)) }}
{{- $env = append $env (dict "name" "BALANCER_SERVER_HOST" "value" .Values.sidecar.host) }}
{{- end }}
{{- if not (has "BALANCER_SERVER_ADMIN_HOST" $named) }}
{{- $admin := $server.admin_host | default $server.host | default "0.0.0.0" }}
{{- $env = append $env (dict "name" "BALANCER_SERVER_ADMIN_HOST" "value" $admin) }}
{{- end }}
{{- toYaml (concat $env $user) }}
{{- end }}

{{/*
The balancer container, shared by the gateway Deployment and the sidecar snippet.
Call with (dict "root" $ "resources" ... "preStop" bool "sidecar" bool).

In a sidecar the container ports are named balancer-http and balancer-admin: a Service of the
app with `targetPort: http` resolves the name over every container of the pod, and must find
the app's port, not balancer's. The gateway's pods are balancer's alone and keep http/admin.
*/}}
{{- define "balancer.containerSpec" -}}
{{- $root := .root -}}
{{- $http := ternary "balancer-http" "http" (.sidecar | default false) -}}
{{- $admin := ternary "balancer-admin" "admin" (.sidecar | default false) -}}
name: balancer
image: {{ include "balancer.image" $root }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
command: ["python", "-m", "balancer"]
args: ["serve", "--config", "/etc/balancer/balancer.yaml"]
{{- if .sidecar }}
env:
  {{- include "balancer.sidecar.env" $root | nindent 2 }}
{{- else if or $root.Values.env $root.Values.extraEnv ($root.Values.zonePreference | default dict).enabled }}
env:
  {{- include "balancer.env" $root | nindent 2 }}
{{- end }}
{{- with $root.Values.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  - name: {{ $http }}
    containerPort: {{ include "balancer.port" $root }}
    protocol: TCP
  - name: {{ $admin }}
    containerPort: {{ include "balancer.adminPort" $root }}
    protocol: TCP
{{- /* Both ports are bound before either serves, and the proxy starts serving first: once
/healthz answers, the proxy accepts, and only then does the app beside a native sidecar start.
/healthz, not /readyz: model servers that are down must not hold the app back, nor have
balancer restarted. */}}
{{- range $probe, $path := dict "startup" "/healthz" "readiness" "/readyz" "liveness" "/healthz" }}
{{ $probe }}Probe:
  httpGet:
    path: {{ $path }}
    port: {{ $admin }}
  {{- toYaml (index $root.Values.probes $probe) | nindent 2 }}
{{- end }}
{{- if and .preStop (gt (int $root.Values.preStopSleepSeconds) 0) }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ $root.Values.preStopSleepSeconds }}
{{- end }}
{{- with .resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.securityContext | nindent 2 }}
volumeMounts:
  - name: balancer-config
    mountPath: /etc/balancer
    readOnly: true
  - name: balancer-tmp
    mountPath: /tmp
{{- with $root.Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The volumes the balancer container mounts.
*/}}
{{- define "balancer.volumes" -}}
- name: balancer-config
  configMap:
    name: {{ include "balancer.configMapName" . }}
- name: balancer-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Sidecar mode, for a parent chart that depends on this one:

  initContainers:   # native sidecar (sidecar.native: true); under `containers` otherwise
    {{- include "balancer.sidecar.container" .Subcharts.balancer | nindent 4 }}
  volumes:
    {{- include "balancer.sidecar.volumes" .Subcharts.balancer | nindent 4 }}

The pod also needs `serviceAccountName` (the one the RoleBinding names),
`enableServiceLinks: false` and terminationGracePeriodSeconds of at least
config.drain.delay + config.drain.timeout (NOTES.txt prints the value with a margin).
*/}}
{{- define "balancer.sidecar.container" -}}
- {{ include "balancer.containerSpec" (dict "root" . "resources" .Values.sidecar.resources "preStop" false "sidecar" true) | indent 2 | trim }}
{{- if .Values.sidecar.native }}
  restartPolicy: Always
{{- end }}
{{- end }}

{{- define "balancer.sidecar.volumes" -}}
{{ include "balancer.volumes" . }}
{{- end }}
