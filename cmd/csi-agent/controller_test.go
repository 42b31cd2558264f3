package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/config"
)

func TestControllerRejectsBadConfig(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte("controller: {rootTTL: 1m}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	if code := run([]string{"controller", "--config", p}, io.Discard, &stderr); code != 1 || !strings.Contains(stderr.String(), "controller.rootTTL") {
		t.Fatalf("exit %d, stderr %q: want 1 naming controller.rootTTL", code, stderr.String())
	}
}

// TestControllerCommand runs the wired controller against a real API server
// (CSI_AGENT_APISERVER_KUBECONFIG: admin kubeconfig): it leads, serves
// /readyz and OIDC discovery, and releases the Lease when stopped.
func TestControllerCommand(t *testing.T) {
	kubeconfig := os.Getenv("CSI_AGENT_APISERVER_KUBECONFIG")
	if kubeconfig == "" {
		t.Skip("set CSI_AGENT_APISERVER_KUBECONFIG to an admin kubeconfig to run against a real API server")
	}
	rest, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(rest)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	ns := "ctlcmd-" + hex.EncodeToString(b)
	domain := ns + ".example"
	ctx := context.Background()
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = client.CertificatesV1().ClusterTrustBundles().DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{LabelSelector: cluster.TrustDomainLabel + "=" + domain})
		_ = client.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
	})
	cfgFile := filepath.Join(t.TempDir(), "controller.yaml")
	yaml := fmt.Sprintf(`trustDomain: %s
metrics: {addr: "127.0.0.1:0"}
controller:
  namespace: %s
  identity: test-replica
  intermediateSigner: %s/node-intermediate
  jwtKeySigner: %s/node-jwt-key
  svidSigner: %s/svid
  oidc: {addr: "127.0.0.1:0", issuer: "https://oidc.%s"}
`, domain, ns, domain, domain, domain, domain)
	if err := os.WriteFile(cfgFile, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.ControllerFromArgs([]string{"--config", cfgFile, "--kubeconfig", kubeconfig}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr, oidcAddr := make(chan net.Addr, 1), make(chan net.Addr, 1)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- runControllerConfig(runCtx, cfg, controllerOptions{version: "test",
			metricsListening: func(a net.Addr) { metricsAddr <- a }, oidcListening: func(a net.Addr) { oidcAddr <- a }})
	}()
	mAddr, oAddr := <-metricsAddr, <-oidcAddr
	get := func(url string) (int, string) {
		resp, err := http.Get(url)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := get("http://" + mAddr.String() + "/metrics")
		ready, _ := get("http://" + mAddr.String() + "/readyz")
		if code == 200 && strings.Contains(body, "csi_agent_controller_leader 1") && ready == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("never led and ready: %d %s (readyz %d)", code, body, ready)
		}
		time.Sleep(100 * time.Millisecond)
	}
	code, body := get("http://" + oAddr.String() + "/.well-known/openid-configuration")
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if code != 200 || json.Unmarshal([]byte(body), &doc) != nil || doc.Issuer != "https://oidc."+domain || doc.JWKSURI != doc.Issuer+"/keys" {
		t.Fatalf("discovery %d: %s", code, body)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatalf("controller: %v", err)
	}
	lease, err := client.CoordinationV1().Leases(ns).Get(ctx, cluster.Lease, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := lease.Spec.HolderIdentity; h != nil && *h != "" {
		t.Fatalf("lease still held by %q after stop", *h)
	}
}
