# csi-agent build and test entry points. `make test` is what CI runs.
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
FUZZTIME  ?=
IMAGE     ?= csi-agent:$(VERSION)

# Every parser of untrusted text, as package:Func:executions. `make fuzz`
# runs each for that many executions (about 8 s each on a 2-core machine);
# the seed corpora also run in every `go test`. Counts, not durations: a
# duration -fuzztime is a context deadline in Go's fuzz coordinator, and
# when that deadline fires the coordinator can read the parent context's
# error before the workers' context is cancelled and fail the target with
# a bare "context deadline exceeded" having found nothing (go1.26.8
# internal/fuzz stop()). A count sets a limit instead and has no deadline.
# FUZZTIME=60s overrides every count for a longer local run.
FUZZ_TARGETS := \
	./attestor/k8s:FuzzParseCgroup:20000 \
	./attestor/k8s:FuzzParsePodList:25000 \
	./attestor/unix:FuzzParseStatus:150000 \
	./attestor/unix:FuzzParseIDNames:200000 \
	./internal/peer:FuzzParseStat:75000 \
	./csi:FuzzValidatePublish:1500 \
	./csi:FuzzSplitTarget:6000 \
	./internal/config:FuzzParse:9000 \
	./internal/rules:FuzzCompileTemplate:150000 \
	./internal/rules:FuzzSelector:250000 \
	./internal/federation:FuzzParseBundle:20000 \
	./internal/ca:FuzzParsePrivateKeyPEM:150000 \
	./internal/ca:FuzzParseCertificatesPEM:75000 \
	./internal/ca:FuzzParseState:75000 \
	./internal/records:FuzzParseJournal:200000 \
	./internal/ca:FuzzUpstreamParse:75000 \
	./workloadapi:FuzzSelectSecrets:20000 \
	./internal/ca:FuzzParseKeyPair:150000 \
	./internal/ca:FuzzParseTrust:40000 \
	./internal/cluster:FuzzParseJWKS:200000 \
	./internal/controller/rootca:FuzzDecode:100000 \
	./internal/controller/csrcheck:FuzzParseRequest:60000 \
	./internal/podcert:FuzzParseRequest:20000

.PHONY: all build test unit fuzz e2e e2e-oldest e2e-podcert-rotation cluster-e2e spire-interop kind-e2e soak bench vet image clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/csi-agent ./cmd/csi-agent

# Every test: unit and root tests, bounded fuzzing, the real-kubelet e2e,
# cluster mode against a real kube-apiserver, federation with a real SPIRE.
# SPIRE's cold build (~21 CPU-minutes) starts first, in the background at
# idle priority, so it takes the CPU the suites leave while they wait on
# kubelets and API servers; the interop test waits for it (a lock in the
# cache). It is stopped, with its whole process group, if the run ends first.
# setsid makes it a session of its own, which the scheduler's autogroups
# would weigh as much as everything else together: its autogroup gets nice
# 19 too, else the suites it runs beside slow by as much as it gains.
test:
	@set -e; log=$${TMPDIR:-/tmp}/csi-agent-spire-prebuild.log; \
	setsid nice -n 19 sh -c 'echo 19 >/proc/self/autogroup 2>/dev/null; cd tests/spire && exec $(GO) run ./cmd/prebuild' >$$log 2>&1 </dev/null & pre=$$!; \
	trap 'kill -TERM -'$$pre' 2>/dev/null || true' EXIT; trap 'exit 1' HUP INT TERM; \
	echo "spire-prebuild: in the background at idle priority (log $$log)"; \
	$(MAKE) vet unit fuzz e2e cluster-e2e spire-interop; \
	cat $$log

vet:
	$(GO) vet ./...
	cd tests/helm && $(GO) vet ./...
	cd tests/spire && $(GO) vet ./...

# tests/helm is its own module (Helm's dependencies stay out of the agent's).
unit:
	$(GO) test -count=1 -timeout 20m ./...
	cd tests/helm && $(GO) test -count=1 -timeout 5m ./...

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; rest=$${t#*:}; fn=$${rest%%:*}; n=$${rest#*:}x; \
		budget=$(if $(FUZZTIME),$(FUZZTIME),$$n); \
		echo "fuzz $$pkg $$fn ($$budget)"; \
		$(GO) test -run '^$$' -fuzz "^$$fn$$" -fuzztime $$budget $$pkg; \
	done

# Federation with a real SPIRE (tests/spire, its own module): SPIRE is built
# from tests/spire/tools once per version, into
# $${XDG_CACHE_HOME:-$$HOME/.cache}/csi-agent-spire/<version>/.
spire-interop:
	cd tests/spire && $(GO) test -count=1 -v -timeout 45m ./...

# The full suite on the current Kubernetes, then spiffe-csi's workload
# manifest on the drop-in.
e2e:
	bash tests/e2e/run.sh
	bash tests/e2e/run.sh --spiffe-csi

# The smoke on the oldest supported Kubernetes (v1.33.13). Not in `make test`:
# its kubelet + kube-apiserver build (~13 CPU-minutes cold) does not fit CI's
# 40-minute cold budget next to the SPIRE build; run it before a release.
e2e-oldest:
	bash tests/e2e/run.sh --oldest

# The kubelet rotating a podCertificate volume (issue 9): the API allows a
# refresh no sooner than 10 minutes after issue, so this run takes ~15 minutes
# more than `make e2e`; not in `make test`.
e2e-podcert-rotation:
	CSI_AGENT_E2E_PODCERT_REFRESH=0.01 bash tests/e2e/run.sh -test.run TestPodCertificate -test.v

# Controller replicas and node agents in cluster mode on a real
# kube-apiserver (etcd + kube-apiserver only, ports 19443/25379; root); then the
# agent's cluster client (17443/23379) and the PodCertificateRequest signer
# (18443/24379), each on its own control plane.
cluster-e2e:
	bash tests/e2e/cluster/run.sh
	cd tests/e2e && $(GO) test -count=1 -timeout 15m ./clusterca/ ./podcert/

kind-e2e:
	bash tests/kind-e2e.sh

# 1,000 streams with a rotation every minute and hostile bursts, under the
# 256 MiB cgroup, for SOAK (default 30m); as root. Not part of `make test`.
SOAK ?= 30m
soak:
	CSI_AGENT_SOAK=$(SOAK) $(GO) test -count=1 -v -timeout 0 -run '^TestSoak$$' ./tests/attack

bench:
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./...
	$(GO) run ./tests/bench

image:
	docker build -t $(IMAGE) --build-arg VERSION=$(VERSION) .

clean:
	rm -rf bin
