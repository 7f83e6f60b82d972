{{/* Names ------------------------------------------------------------------------------------------- */}}

{{- define "megatron-rl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "megatron-rl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The run's name: control.run_name and the Job's name. At most 56 characters, so that the pods'
host names (<job>-<index>) stay DNS labels. */}}
{{- define "megatron-rl.runName" -}}
{{- default (include "megatron-rl.fullname" .) .Values.runName | trunc 56 | trimSuffix "-" -}}
{{- end -}}

{{- define "megatron-rl.rendezvousService" -}}
{{- printf "%s-ranks" (include "megatron-rl.runName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "megatron-rl.etcdName" -}}
{{- printf "%s-etcd" (include "megatron-rl.fullname" .) | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "megatron-rl.etcdPeerService" -}}
{{- printf "%s-peers" (include "megatron-rl.etcdName" .) -}}
{{- end -}}

{{- define "megatron-rl.sandboxName" -}}
{{- printf "%s-sandbox" (include "megatron-rl.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "megatron-rl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "megatron-rl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "megatron-rl.checkpointClaim" -}}
{{- default (printf "%s-runs" (include "megatron-rl.fullname" .)) .Values.checkpoints.existingClaim -}}
{{- end -}}

{{- define "megatron-rl.runDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.checkpoints.mountPath) (include "megatron-rl.runName" .) -}}
{{- end -}}

{{- define "megatron-rl.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* Labels ------------------------------------------------------------------------------------------ */}}

{{- define "megatron-rl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "megatron-rl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "megatron-rl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "megatron-rl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
megatron-rl/run: {{ include "megatron-rl.runName" . }}
{{- end -}}

{{/* Endpoints --------------------------------------------------------------------------------------- */}}

{{/* control.etcd_endpoints, as JSON (include returns text): the in-chart etcd's client Service, or the
external endpoints. */}}
{{- define "megatron-rl.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- list (printf "http://%s.%s.svc:%d" (include "megatron-rl.etcdName" .) .Release.Namespace (int .Values.etcd.clientPort)) | toJson -}}
{{- else -}}
{{- .Values.etcd.externalEndpoints | toJson -}}
{{- end -}}
{{- end -}}

{{- define "megatron-rl.sidecarUrl" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.rollout.sidecarPort) -}}
{{- end -}}

{{/* With nodes > 1 every pod's engine rolls out: pod 0's driver reaches the other pods' sidecars (and their
engines) at their DNS names in the rendezvous Service, with this Secret's token. */}}
{{- define "megatron-rl.multiNode" -}}
{{- if gt (int .Values.nodes) 1 -}}true{{- end -}}
{{- end -}}

{{- define "megatron-rl.sidecarTokenSecret" -}}
{{- printf "%s-sidecar-token" (include "megatron-rl.runName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "megatron-rl.podHost" -}}
{{- printf "%s-%s.%s" (include "megatron-rl.runName" .root) (toString .index) (include "megatron-rl.rendezvousService" .root) -}}
{{- end -}}

{{- define "megatron-rl.peerSidecarUrls" -}}
{{- $urls := list -}}
{{- range $index := untilStep 1 (int .Values.nodes) 1 -}}
{{- $urls = append $urls (printf "http://%s:%d" (include "megatron-rl.podHost" (dict "root" $ "index" $index)) (int $.Values.rollout.sidecarPort)) -}}
{{- end -}}
{{- $urls | toJson -}}
{{- end -}}

{{/* The run config ------------------------------------------------------------------------------------
The user's `config` sections with what the chart owns set on top: the model and layout, the SGLang
engine and its per-pod layout, the sidecar's pod-local address (with nodes > 1: every pod's sidecar and
engine on the pod network, the other pods' sidecars as the driver's peers), the shared /dev/shm, the etcd
store, and the sandbox's Service for code rewards (when the chart runs one).
Setting an owned key in `config` is an error rather than silently replaced. hybrid.pod_name is set per
pod, on the command lines (from the pod's name). */}}
{{- define "megatron-rl.runConfig" -}}
{{- $config := deepCopy .Values.config -}}
{{- $owned := dict
  "rollout" (list "engine" "engine_url" "engine_host")
  "hybrid" (list "sidecar_url" "sidecar_host" "sidecar_port" "sidecar_token_file" "pod_name" "shm_dir" "advertise_host" "peer_sidecar_urls")
  "control" (list "store" "etcd_endpoints" "run_name")
  "reward" (list "sandbox_url") -}}
{{- range $section, $keys := $owned -}}
{{- $given := get $config $section | default dict -}}
{{- range $keys -}}
{{- if hasKey $given . -}}
{{- fail (printf "config.%s.%s is set by the chart (see values.yaml: rollout, etcd, runName); remove it from config" $section .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $rollout := get $config "rollout" | default dict -}}
{{- $userArgs := get $rollout "sglang_args" | default list -}}
{{- range $userArgs -}}
{{- $flag := regexReplaceAll "=.*$" (toString .) "" -}}
{{- if has $flag (list "--tp-size" "--tensor-parallel-size" "--dp-size" "--data-parallel-size") -}}
{{- fail (printf "config.rollout.sglang_args: %s is set by the chart from gpusPerPod and rollout.enginesPerPod; remove it" $flag) -}}
{{- end -}}
{{- end -}}
{{- $engines := int .Values.rollout.enginesPerPod -}}
{{- $engineArgs := list "--tp-size" (toString (div (int .Values.gpusPerPod) $engines)) "--dp-size" (toString $engines) -}}
{{- $_ := set $rollout "engine" "sglang" -}}
{{- $_ := set $rollout "engine_host" (ternary "0.0.0.0" "127.0.0.1" (eq (include "megatron-rl.multiNode" .) "true")) -}}
{{- $_ := set $rollout "sglang_args" (concat $engineArgs $userArgs) -}}
{{- $_ := set $config "rollout" $rollout -}}
{{- $hybrid := get $config "hybrid" | default dict -}}
{{- $_ := set $hybrid "sidecar_host" (ternary "0.0.0.0" "127.0.0.1" (eq (include "megatron-rl.multiNode" .) "true")) -}}
{{- $_ := set $hybrid "sidecar_port" (int .Values.rollout.sidecarPort) -}}
{{- if include "megatron-rl.multiNode" . -}}
{{- $_ := set $hybrid "peer_sidecar_urls" (include "megatron-rl.peerSidecarUrls" . | fromJsonArray) -}}
{{- end -}}
{{- $_ := set $hybrid "sidecar_url" (include "megatron-rl.sidecarUrl" .) -}}
{{- $_ := set $hybrid "shm_dir" "/dev/shm" -}}
{{- $_ := set $config "hybrid" $hybrid -}}
{{- $control := get $config "control" | default dict -}}
{{- $_ := set $control "store" "etcd" -}}
{{- $_ := set $control "etcd_endpoints" (include "megatron-rl.etcdEndpoints" . | fromJsonArray) -}}
{{- $_ := set $control "run_name" (include "megatron-rl.runName" .) -}}
{{- $_ := set $config "control" $control -}}
{{- if .Values.sandbox.enabled -}}
{{- $reward := get $config "reward" | default dict -}}
{{- $_ := set $reward "sandbox_url" (printf "http://%s:%d" (include "megatron-rl.sandboxName" .) (int .Values.sandbox.port)) -}}
{{- $_ := set $config "reward" $reward -}}
{{- end -}}
{{- $_ := set $config "model" (dict "hf_path" .Values.model.hfPath "dtype" .Values.model.dtype "max_sequence_length" (int .Values.model.maxSequenceLength)) -}}
{{- $_ := set $config "parallel" (dict "tp" (int .Values.parallel.tp) "pp" (int .Values.parallel.pp) "cp" (int .Values.parallel.cp)) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Checks that the schema cannot express ---------------------------------------------------------- */}}
{{- define "megatron-rl.validate" -}}
{{- $world := mul (int .Values.nodes) (int .Values.gpusPerPod) -}}
{{- $modelParallel := mul (int .Values.parallel.tp) (int .Values.parallel.pp) (int .Values.parallel.cp) -}}
{{- if ne 0 (mod $world $modelParallel) -}}
{{- fail (printf "parallel.tp × pp × cp = %d does not divide the trainer's world size nodes × gpusPerPod = %d; change parallel or the pod layout" $modelParallel $world) -}}
{{- end -}}
{{- if gt (int .Values.parallel.cp) 1 -}}
{{- fail "parallel.cp: context parallelism is not wired into megatron-rl's trainer yet; use cp 1 (and TP/PP for long sequences)" -}}
{{- end -}}
{{- if ne 0 (mod (int .Values.gpusPerPod) (int .Values.rollout.enginesPerPod)) -}}
{{- fail (printf "rollout.enginesPerPod = %d does not divide gpusPerPod = %d (each engine takes an equal share of the pod's GPUs)" (int .Values.rollout.enginesPerPod) (int .Values.gpusPerPod)) -}}
{{- end -}}
{{- $ports := list (int .Values.rollout.enginePort) (int .Values.rollout.sidecarPort) (int .Values.rendezvous.port) -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail (printf "rollout.enginePort, rollout.sidecarPort and rendezvous.port must differ (they share the pod's network): %v" $ports) -}}
{{- end -}}
{{- $weightSync := get (get .Values.config "hybrid" | default dict) "weight_sync" | default "disk" -}}
{{- if and (gt (int .Values.nodes) 1) (eq $weightSync "cuda_ipc") -}}
{{- fail "config.hybrid.weight_sync: with nodes > 1 every pod's engine rolls out, and cuda_ipc hands weights over within one node only; set it to disk (each pod's sidecar fetches what its node's copy lacks) or nccl (broadcast)" -}}
{{- end -}}
{{- if and (gt (int .Values.nodes) 1) (not .Values.checkpoints.existingClaim) (not (has "ReadWriteMany" .Values.checkpoints.accessModes)) -}}
{{- fail "checkpoints.accessModes: with nodes > 1 every pod writes checkpoint shards to the run directory; use ReadWriteMany (or an existingClaim on a shared file system)" -}}
{{- end -}}
{{- if and (eq .Values.gpu.mode "dra") (not (semverCompare ">=1.34.0-0" .Capabilities.KubeVersion.Version)) (eq .Values.gpu.dra.apiVersion "resource.k8s.io/v1") -}}
{{- fail (printf "gpu.dra.apiVersion resource.k8s.io/v1 needs Kubernetes 1.34 or later (this is %s): use resource.k8s.io/v1beta2 on 1.33, or gpu.mode=devicePlugin" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}

{{/* What both containers of a run pod share ---------------------------------------------------------- */}}

{{- define "megatron-rl.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RUN_DIR
  value: {{ include "megatron-rl.runDir" . }}
- name: NODE_RANK
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
{{- if include "megatron-rl.multiNode" . }}
# The sidecars' and engines' bearer token: they listen on the pod network.
- name: MEGATRON_RL_SIDECAR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "megatron-rl.sidecarTokenSecret" . }}
      key: token
{{- end }}
{{- end -}}

{{- define "megatron-rl.podVolumeMounts" -}}
- name: config
  mountPath: /etc/megatron-rl
  readOnly: true
- name: shm
  mountPath: /dev/shm
- name: runs
  mountPath: {{ .Values.checkpoints.mountPath }}
{{- if .Values.model.volume.existingClaim }}
- name: models
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}
