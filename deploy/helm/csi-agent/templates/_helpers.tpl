{{/* Helm's labels on every object; otherwise the objects are deploy/kind's. */}}
{{- define "csi-agent.labels" -}}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The driver name and socket name in force: spiffeCSI overrides the values. */}}
{{- define "csi-agent.driverName" -}}
{{- if .Values.spiffeCSI }}csi.spiffe.io{{ else }}{{ required "driverName is required" .Values.driverName }}{{ end }}
{{- end }}
{{- define "csi-agent.socketName" -}}
{{- if .Values.spiffeCSI }}spire-agent.sock{{ else }}{{ required "socketName is required" .Values.socketName }}{{ end }}
{{- end }}

{{/* The CA mode in the agent's terms; "self" is the chart's old name. */}}
{{- define "csi-agent.caMode" -}}
{{- $m := .Values.ca.mode }}
{{- if eq $m "self" }}{{ $m = "selfManaged" }}{{ end }}
{{- if not (has $m (list "cluster" "selfManaged" "upstream")) }}
{{- fail (printf "ca.mode must be cluster, selfManaged or upstream, got %q" .Values.ca.mode) }}
{{- end }}
{{- $m }}
{{- end }}

{{/* The agent's config.yaml. */}}
{{- define "csi-agent.config" -}}
{{- $kubelet := dict "host" "127.0.0.1" "port" 10250 "tokenFile" "/var/run/secrets/kubernetes.io/serviceaccount/token" }}
{{- with .Values.kubelet.caFile }}{{ $_ := set $kubelet "caFile" . }}{{ end }}
{{- $wl := dict "socketDir" "/run/csi-agent/sockets" "socketName" .Values.socketName }}
{{- if and .Values.socketAliases (not .Values.spiffeCSI) }}{{ $_ := set $wl "socketAliases" .Values.socketAliases }}{{ end }}
{{- $cfg := dict
  "trustDomain" .Values.trustDomain
  "stateDir" "/var/lib/csi-agent"
  "workloadAPI" $wl
  "csi" (dict "socket" (printf "/var/lib/kubelet/plugins/%s/csi.sock" .Values.driverName) "driverName" .Values.driverName "kubeletRootDir" "/var/lib/kubelet")
  "kubernetes" (dict "crossCheck" .Values.kubelet.crossCheck "kubelet" $kubelet)
  "ca" (dict "x509SVIDTTL" .Values.ca.x509SVIDTTL "jwtSVIDTTL" .Values.ca.jwtSVIDTTL "cluster" (dict "namespace" .Release.Namespace))
  "controller" (dict "agentServiceAccounts" (list (printf "%s:csi-agent" .Release.Namespace)))
}}
{{- with .Values.metrics.addr }}{{ $_ := set $cfg "metrics" (dict "addr" .) }}{{ end }}
{{- with .Values.rules }}{{ $_ := set $cfg "svids" . }}{{ end }}
{{- with .Values.federation.trustDomains }}{{ $_ := set $cfg "federation" . }}{{ end }}
{{- range $k, $v := .Values.extraConfig }}{{ $_ := set $cfg $k $v }}{{ end }}
{{- toYaml $cfg }}
{{- end }}
