package controller

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authv1 "k8s.io/api/authentication/v1"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

// TestAgainstAPIServer runs the controller against a real kube-apiserver
// (CSI_AGENT_APISERVER_KUBECONFIG: an admin kubeconfig; e.g. the e2e
// framework's standalone control plane). Everything it makes is named
// uniquely, signers included, so it does not meet another controller.
func TestAgainstAPIServer(t *testing.T) {
	kubeconfig := os.Getenv("CSI_AGENT_APISERVER_KUBECONFIG")
	if kubeconfig == "" {
		t.Skip("set CSI_AGENT_APISERVER_KUBECONFIG to an admin kubeconfig to run against a real API server")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(admin)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	id := "ctltest-" + hex.EncodeToString(b)
	ns, node, other := id, id+"-node-a", id+"-node-b"
	domain := id + ".example"
	testTD := spiffeid.RequireTrustDomainFromString(domain)

	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err = client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	must(err)
	var nodeObj *corev1.Node
	for _, n := range []string{node, other} {
		obj, err := client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{})
		must(err)
		if n == node {
			nodeObj = obj
		}
	}
	_, err = client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "agent"}}, metav1.CreateOptions{})
	must(err)
	_, err = client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: id},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"certificatesigningrequests"}, Verbs: []string{"create", "get"}}}}, metav1.CreateOptions{})
	must(err)
	_, err = client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: id},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: id},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "agent", Namespace: ns}}}, metav1.CreateOptions{})
	must(err)
	o := testOptions()
	o.TrustDomain, o.Namespace = testTD, ns
	o.IntermediateSigner, o.JWTKeySigner, o.SVIDSigner = domain+"/node-intermediate", domain+"/node-jwt-key", domain+"/svid"
	o.AgentServiceAccounts = []string{ns + ":agent"}
	o.RootActivationDelay = time.Second
	t.Cleanup(func() {
		bg := context.Background()
		_ = client.RbacV1().ClusterRoleBindings().Delete(bg, id, metav1.DeleteOptions{})
		_ = client.RbacV1().ClusterRoles().Delete(bg, id, metav1.DeleteOptions{})
		_ = client.CertificatesV1().ClusterTrustBundles().Delete(bg, cluster.TrustBundleName(o.SVIDSigner, testTD), metav1.DeleteOptions{})
		for _, n := range []string{node, other} {
			_ = client.CoreV1().Nodes().Delete(bg, n, metav1.DeleteOptions{})
		}
		csrs, _ := client.CertificatesV1().CertificateSigningRequests().List(bg, metav1.ListOptions{})
		for _, c := range csrs.Items {
			if c.Spec.SignerName == o.IntermediateSigner || c.Spec.SignerName == o.JWTKeySigner {
				_ = client.CertificatesV1().CertificateSigningRequests().Delete(bg, c.Name, metav1.DeleteOptions{})
			}
		}
		_ = client.CoreV1().Namespaces().Delete(bg, ns, metav1.DeleteOptions{})
	})

	// The agent: a Node-bound service-account token, as a pod's carries.
	tr, err := client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "agent", &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		BoundObjectRef: &authv1.BoundObjectReference{Kind: "Node", APIVersion: "v1", Name: node, UID: nodeObj.UID},
	}}, metav1.CreateOptions{})
	must(err)
	agentCfg := rest.AnonymousClientConfig(admin)
	agentCfg.BearerToken = tr.Status.Token
	agent := kubernetes.NewForConfigOrDie(agentCfg)

	c, err := New(client, o)
	must(err)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	request := func(name, signer, sanNode string) *certv1.CertificateSigningRequest {
		t.Helper()
		csr := csrObject(t, name, signer, testTD, sanNode)
		_, err := agent.CertificatesV1().CertificateSigningRequests().Create(ctx, csr, metav1.CreateOptions{})
		must(err)
		var got *certv1.CertificateSigningRequest
		eventually(t, "CSR "+name+" answered", func() bool {
			got, err = client.CertificatesV1().CertificateSigningRequests().Get(ctx, name, metav1.GetOptions{})
			must(err)
			return len(got.Status.Certificate) > 0 || hasCondition(got, certv1.CertificateDenied, cluster.ReasonDenied)
		})
		return got
	}
	roots := func() []*x509.Certificate {
		ctb, err := client.CertificatesV1().ClusterTrustBundles().Get(ctx, cluster.TrustBundleName(o.SVIDSigner, testTD), metav1.GetOptions{})
		must(err)
		certs, err := ca.ParseCertificatesPEM([]byte(ctb.Spec.TrustBundle))
		must(err)
		return certs
	}
	signedBy := func(csr *certv1.CertificateSigningRequest) *x509.Certificate {
		t.Helper()
		blk, _ := pem.Decode(csr.Status.Certificate)
		if blk == nil {
			t.Fatalf("CSR %s has no certificate: %+v", csr.Name, csr.Status.Conditions)
		}
		crt, err := x509.ParseCertificate(blk.Bytes)
		must(err)
		for _, r := range roots() {
			if crt.CheckSignatureFrom(r) == nil {
				return r
			}
		}
		t.Fatalf("CSR %s's certificate is not signed by a published root", csr.Name)
		return nil
	}

	first := signedBy(request(id+"-1", o.IntermediateSigner, node))
	if got := request(id+"-2", o.IntermediateSigner, other); len(got.Status.Certificate) > 0 {
		t.Fatal("an agent got an intermediate for another node")
	}
	request(id+"-3", o.JWTKeySigner, node)
	eventually(t, "the JWT key in the JWKS", func() bool { return len(jwksIn(t, client, ns)) == 1 })

	// Rotation: the next root is published first, then signs.
	sec, err := client.CoreV1().Secrets(ns).Get(ctx, cluster.RootSecret, metav1.GetOptions{})
	must(err)
	sec.Annotations[rootca.AnnotationRotate] = "test"
	_, err = client.CoreV1().Secrets(ns).Update(ctx, sec, metav1.UpdateOptions{})
	must(err)
	eventually(t, "two roots published", func() bool { return len(roots()) == 2 })
	eventually(t, "the next root signing", func() bool {
		p, err := c.Holder().Current()
		return err == nil && !p.Cert.Equal(first)
	})
	second := signedBy(request(id+"-4", o.IntermediateSigner, node))
	if second.Equal(first) || len(roots()) != 2 {
		t.Fatal("after the rotation the old root signs, or is no longer published")
	}

	// The node goes: its JWT key leaves the JWKS.
	must(client.CoreV1().Nodes().Delete(ctx, node, metav1.DeleteOptions{}))
	eventually(t, "the deleted node's key to go", func() bool { return len(jwksIn(t, client, ns)) == 0 })
}

func jwksIn(t *testing.T, client kubernetes.Interface, ns string) []cluster.JWTKey {
	t.Helper()
	cm, err := client.CoreV1().ConfigMaps(ns).Get(context.Background(), cluster.JWKSConfigMap, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	keys, err := cluster.ParseJWKS([]byte(cm.Data[cluster.JWKSKey]))
	if err != nil {
		t.Fatal(err)
	}
	return keys
}
