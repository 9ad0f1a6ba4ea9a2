{{/* Names --------------------------------------------------------------------------------------------------- */}}
{{- define "gptoss.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; the RayService and every object start with it. Kept short enough for KubeRay's generated
     RayCluster / Service names (it appends a suffix of up to 20 characters). */}}
{{- define "gptoss.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gptoss.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels (Kubernetes recommended labels) ---------------------------------------------------------------------- */}}
{{- define "gptoss.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gptoss.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gptoss.labels" -}}
helm.sh/chart: {{ include "gptoss.chart" . }}
{{ include "gptoss.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gptoss-cluster
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* labels + app.kubernetes.io/component; call with (dict "ctx" $ "component" "router") */}}
{{- define "gptoss.componentLabels" -}}
{{ include "gptoss.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "gptoss.componentSelector" -}}
{{ include "gptoss.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Values that derive from others ------------------------------------------------------------------------------ */}}
{{- define "gptoss.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "gptoss.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "gptoss.fullname" .)) }}
{{- end }}

{{- define "gptoss.servedName" -}}
{{- .Values.model.servedName | default (base (trimSuffix "/" .Values.model.path)) }}
{{- end }}

{{/* Operator objects: "auto" follows the cluster's APIs (helm template: --api-versions monitoring.coreos.com/v1). */}}
{{- define "gptoss.promOperator" -}}
{{- $on := toString .enabled -}}
{{- if or (eq $on "true") (and (eq $on "auto") (.ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end }}
{{- end }}

{{/* GPU worker pods: enough GPUs for `n` replicas × shards, `gpusPerPod` each (CPU: one pod per replica). */}}
{{- define "gptoss.workerPods" -}}
{{- $per := int .ctx.Values.workers.gpusPerPod -}}
{{- $shards := int .ctx.Values.serve.shardsPerReplica -}}
{{- if gt $per 0 -}}
{{- div (add (mul (int .n) $shards) (sub $per 1)) $per -}}
{{- else -}}
{{- int .n -}}
{{- end }}
{{- end }}

{{/* Checks the schema cannot express; one clear line each. */}}
{{- define "gptoss.validate" -}}
{{- $v := .Values -}}
{{- $shards := int $v.serve.shardsPerReplica -}}
{{- if and (eq $v.serve.device "cuda") (eq (int $v.workers.gpusPerPod) 0) -}}
{{- fail "serve.device is cuda but workers.gpusPerPod is 0: give the worker pods GPUs, or set serve.device=cpu" -}}
{{- end -}}
{{- if and (gt (int $v.workers.gpusPerPod) 0) (ne (mod (int $v.workers.gpusPerPod) $shards) 0) -}}
{{- fail (printf "workers.gpusPerPod (%d) must be a multiple of serve.shardsPerReplica (%d): a replica's shards share one pod" (int $v.workers.gpusPerPod) $shards) -}}
{{- end -}}
{{- if and $v.serve.autoscaling.enabled (gt (int $v.serve.autoscaling.minReplicas) (int $v.serve.autoscaling.maxReplicas)) -}}
{{- fail (printf "serve.autoscaling.minReplicas (%d) is above maxReplicas (%d)" (int $v.serve.autoscaling.minReplicas) (int $v.serve.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and (eq $v.model.storage.type "hostPath") (not $v.model.storage.hostPath.path) -}}
{{- fail "model.storage.type is hostPath: set model.storage.hostPath.path" -}}
{{- end -}}
{{- if and $v.model.fetch.enabled (eq $v.model.storage.type "none") -}}
{{- fail "model.fetch.enabled needs somewhere to write: model.storage.type pvc, hostPath or emptyDir" -}}
{{- end -}}
{{- if and (eq $v.model.storage.type "emptyDir") (not $v.model.fetch.enabled) -}}
{{- fail "model.storage.type emptyDir starts empty: enable model.fetch to fill it" -}}
{{- end -}}
{{- if and $v.model.fetch.enabled (not $v.model.fetch.command) -}}
{{- fail "model.fetch.enabled: set model.fetch.command" -}}
{{- end -}}
{{- if and (ne $v.model.storage.type "none") (not (hasPrefix (trimSuffix "/" $v.model.storage.mountPath) $v.model.path)) -}}
{{- fail (printf "model.path (%s) must be under model.storage.mountPath (%s)" $v.model.path $v.model.storage.mountPath) -}}
{{- end -}}
{{- end }}

{{/* The build_app arguments (README.md "Serve application arguments"; files/serve-args.schema.json). */}}
{{- define "gptoss.serveArgs" -}}
{{- $s := .Values.serve -}}
{{- $engine := dict -}}
{{- range $key, $name := dict "maxNumSeqs" "max_num_seqs" "maxNumBatchedTokens" "max_num_batched_tokens" "maxModelLen" "max_model_len" "blockSize" "block_size" -}}
{{- if not (kindIs "invalid" (index $s.engine $key)) }}{{ $_ := set $engine $name (int (index $s.engine $key)) }}{{ end -}}
{{- end -}}
{{- range $key, $name := dict "enablePrefixCaching" "enable_prefix_caching" "enableChunkedPrefill" "enable_chunked_prefill" "schedulingPolicy" "scheduling_policy" -}}
{{- if not (kindIs "invalid" (index $s.engine $key)) }}{{ $_ := set $engine $name (index $s.engine $key) }}{{ end -}}
{{- end -}}
{{- if not (kindIs "invalid" $s.engine.kvMemoryFraction) }}{{ $_ := set $engine "kv_memory_fraction" (float64 $s.engine.kvMemoryFraction) }}{{ end -}}
{{- if not (kindIs "invalid" $s.engine.cpuKvSpaceGib) }}{{ $_ := set $engine "cpu_kv_space_gib" (float64 $s.engine.cpuKvSpaceGib) }}{{ end -}}
{{- $sampling := dict -}}
{{- if not (kindIs "invalid" $s.sampling.temperature) }}{{ $_ := set $sampling "temperature" (float64 $s.sampling.temperature) }}{{ end -}}
{{- if not (kindIs "invalid" $s.sampling.topP) }}{{ $_ := set $sampling "top_p" (float64 $s.sampling.topP) }}{{ end -}}
{{- if not (kindIs "invalid" $s.sampling.maxTokens) }}{{ $_ := set $sampling "max_tokens" (int $s.sampling.maxTokens) }}{{ end -}}
{{- $args := dict
      "model" .Values.model.path
      "served_model_name" (include "gptoss.servedName" .)
      "shards_per_replica" (int $s.shardsPerReplica)
      "device" $s.device
      "dtype" $s.dtype
      "max_ongoing_requests" (int $s.maxOngoingRequests)
      "router_replicas" (int .Values.routers.replicas)
      "max_queued_requests" (int $s.router.maxQueuedRequests)
      "stream_interval" (int $s.router.streamInterval)
      "replica_transport" $s.router.replicaTransport
      "routing_policy" $s.router.routingPolicy
      "grpc_port" (int $s.grpcPort)
      "http_port" (int $s.openaiPort)
      "metrics_port" 0
      "auth_token_env" (ternary "GPTOSS_AUTH_TOKEN" "" .Values.auth.enabled)
      "engine" $engine
      "sampling_defaults" $sampling
      "default_reasoning_effort" $s.reasoningEffort
-}}
{{- $lora := dict -}}
{{- range .Values.lora.modules -}}
{{- if hasKey $lora .name }}{{ fail (printf "lora.modules: the adapter name %s is listed twice" .name) }}{{ end -}}
{{- $_ := set $lora .name .path -}}
{{- end -}}
{{- if $lora }}{{ $_ := set $args "lora_modules" $lora }}{{ end -}}
{{- $_ := set $args "max_loras" (int .Values.lora.maxLoras) -}}
{{- $_ := set $args "max_lora_rank" (int .Values.lora.maxLoraRank) -}}
{{- if $s.autoscaling.enabled -}}
{{- $_ := set $args "autoscaling_config" (include "gptoss.autoscalingConfig" . | fromYaml) -}}
{{- else -}}
{{- $_ := set $args "num_replicas" (int $s.replicas) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $args (deepCopy $s.extraArgs)) }}
{{- end }}

{{- define "gptoss.autoscalingConfig" -}}
{{- $a := .Values.serve.autoscaling -}}
min_replicas: {{ int $a.minReplicas }}
max_replicas: {{ int $a.maxReplicas }}
target_ongoing_requests: {{ int $a.targetOngoingRequests }}
upscale_delay_s: {{ int $a.upscaleDelayS }}
downscale_delay_s: {{ int $a.downscaleDelayS }}
{{- end }}

{{/* serveConfigV2: one application, deployments Router and ModelReplica. Scaling lives in `deployments` too, so
     `serve deploy` / dashboard edits of num_replicas are lightweight updates. */}}
{{- define "gptoss.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $envVars := dict "PROMETHEUS_MULTIPROC_DIR" .Values.metrics.multiprocDir -}}
{{- /* bind addresses are machine settings, not build_app arguments: cluster.app reads them from the environment */ -}}
{{- with $s.grpcHost }}{{ $_ := set $envVars "GPTOSS_GRPC_HOST" . }}{{ end -}}
{{- $runtimeEnv := deepCopy $s.runtimeEnv -}}
{{- $_ := set $runtimeEnv "env_vars" (mergeOverwrite $envVars (default (dict) $runtimeEnv.env_vars)) -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ int $s.httpPort }}
applications:
  - name: {{ $s.appName }}
    route_prefix: /
    import_path: gptoss_cluster.cluster.app:build_app
    runtime_env:
      {{- toYaml $runtimeEnv | nindent 6 }}
    args:
      {{- include "gptoss.serveArgs" . | nindent 6 }}
    deployments:
      - name: Router
        num_replicas: {{ int .Values.routers.replicas }}
        ray_actor_options:
          num_cpus: {{ .Values.routers.rayCpus }}
          resources:
            gptoss_router: 1
          {{- /* cluster.app.ROUTER_SERVE_ENV: Serve's router and the Router's code on one event loop, and the
                 message limit of Serve's gRPC transport (cluster.app.SERVE_GRPC_MAX_MESSAGE_BYTES) */}}
          runtime_env:
            env_vars:
              RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP: "0"
              RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD: "0"
              RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH: "268435456"
      - name: ModelReplica
        {{- /* + one slot per Router replica for its token channel (cluster.app.replica_max_ongoing) */}}
        max_ongoing_requests: {{ add (int $s.maxOngoingRequests) (int .Values.routers.replicas) }}
        {{- if $s.autoscaling.enabled }}
        autoscaling_config:
          {{- include "gptoss.autoscalingConfig" . | nindent 10 }}
        {{- else }}
        num_replicas: {{ int $s.replicas }}
        {{- end }}
{{- end }}

{{/* Pod pieces shared by the Ray groups ------------------------------------------------------------------------ */}}
{{- define "gptoss.exporterContainer" -}}
- name: metrics-exporter
  image: {{ include "gptoss.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "-m", "gptoss_cluster.cluster.metrics"]
  args:
    - --port={{ int .Values.metrics.port }}
    - --dir={{ .Values.metrics.multiprocDir }}
    {{- if not .Values.metrics.exporter.reapDeadProcesses }}
    - --no-reap
    {{- end }}
  ports:
    - name: metrics
      containerPort: {{ int .Values.metrics.port }}
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /metrics
      port: metrics
    periodSeconds: 10
  livenessProbe:
    tcpSocket:
      port: metrics
    periodSeconds: 20
  resources:
    {{- toYaml .Values.metrics.exporter.resources | nindent 4 }}
  volumeMounts:
    - name: metrics
      mountPath: {{ .Values.metrics.multiprocDir }}
{{- end }}

{{/* Environment of the Ray containers: the tracing variables (when tracing.otlpEndpoint is set), extraEnv, and on
     router pods the API token. */}}
{{- define "gptoss.env" -}}
{{- with .ctx.Values.tracing }}
{{- if .otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- if not (kindIs "invalid" .samplerArg) }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | toString | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with .ctx.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- if and .router .ctx.Values.auth.enabled }}
- name: GPTOSS_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "gptoss.secretName" .ctx }}
      key: {{ .ctx.Values.auth.secretKey }}
{{- end }}
{{- end }}

{{- define "gptoss.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.metrics.exporter.reapDeadProcesses }}
shareProcessNamespace: true
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "gptoss.modelVolume" -}}
{{- $st := .Values.model.storage -}}
{{- if eq $st.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $st.pvc.existingClaim | default (printf "%s-model" (include "gptoss.fullname" .)) }}
{{- else if eq $st.type "hostPath" }}
- name: model
  hostPath:
    path: {{ $st.hostPath.path }}
    type: {{ ternary "DirectoryOrCreate" "Directory" .Values.model.fetch.enabled }}
{{- else if eq $st.type "emptyDir" }}
- name: model
  emptyDir:
    {{- with $st.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- end }}
{{- end }}
