# Multi-stage build: a static binary on a minimal base.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/csi-agent ./cmd/csi-agent

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/csi-agent /csi-agent
# The image runs as non-root by default (the client commands need nothing
# more). The node agent itself needs root: it bind-mounts into the kubelet's
# pods dir, reads every process's /proc entries and runs with hostPID; the
# DaemonSet sets runAsUser: 0 and privileged.
USER 65532:65532
ENTRYPOINT ["/csi-agent"]
CMD ["run"]
