// Package clusterca is the Kubernetes side of the CA's cluster mode: it has
// keys made on the node certified through certificates.k8s.io/v1
// CertificateSigningRequests (ca.ClusterSigner), and watches the trust
// domain's ClusterTrustBundle and JWKS ConfigMap (ca.TrustSource).
//
// It is tested against a real kube-apiserver in tests/e2e/clusterca.
package clusterca

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	certinformers "k8s.io/client-go/informers/certificates/v1"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	watchtools "k8s.io/client-go/tools/watch"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/cluster"
)

// minExpiration is the shortest expirationSeconds the API server accepts.
const minExpiration = 10 * time.Minute

// Options configure a Client; internal/config owns the defaults.
type Options struct {
	TrustDomain spiffeid.TrustDomain
	NodeName    string
	// Namespace holds the JWKS ConfigMap (the controller's namespace).
	Namespace          string
	IntermediateSigner string
	JWTKeySigner       string
	// BundleSigner is the signer the ClusterTrustBundle is linked to.
	BundleSigner string
}

// Client talks to the API server for one node agent.
type Client struct {
	cs   kubernetes.Interface
	opts Options

	mu      sync.Mutex
	synced  bool
	told    bool // Changed fired since synced
	trust   ca.Trust
	changed chan struct{}
	// jwksRV is the ConfigMap version last parsed, so that a bad one is
	// reported once.
	jwksRV string
	// rev is the largest resourceVersion of the objects trust was built
	// from (revision.go).
	rev uint64

	ctbs, jwks cache.SharedIndexInformer
}

var (
	_ ca.ClusterSigner = (*Client)(nil)
	_ ca.TrustSource   = (*Client)(nil)
)

// RESTConfig is the API server client configuration: from kubeconfig, or
// in-cluster (the pod-bound service account token) when it is empty.
func RESTConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("clusterca: in-cluster config: %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("clusterca: kubeconfig %s: %w", kubeconfig, err)
	}
	return cfg, nil
}

// New returns a client over cs; Run watches the trust.
func New(cs kubernetes.Interface, opts Options) (*Client, error) {
	if opts.NodeName == "" {
		return nil, errors.New("clusterca: node name is required")
	}
	return NewTrust(cs, opts)
}

// NewTrust returns a client that only watches the trust (Run, Trust,
// TrustRevision): the controller's bundle endpoint, which is no node and
// never signs through it.
func NewTrust(cs kubernetes.Interface, opts Options) (*Client, error) {
	switch {
	case opts.TrustDomain.IsZero():
		return nil, errors.New("clusterca: trust domain is required")
	case opts.Namespace == "" || opts.IntermediateSigner == "" || opts.JWTKeySigner == "" || opts.BundleSigner == "":
		return nil, errors.New("clusterca: namespace and signer names are required")
	}
	c := &Client{cs: cs, opts: opts, changed: make(chan struct{})}
	tdLabel := labels.Set{cluster.TrustDomainLabel: opts.TrustDomain.Name()}.String()
	signer := fields.OneTermEqualSelector("spec.signerName", opts.BundleSigner).String()
	c.ctbs = certinformers.NewFilteredClusterTrustBundleInformer(cs, 0, cache.Indexers{}, func(o *metav1.ListOptions) {
		o.FieldSelector, o.LabelSelector = signer, tdLabel
	})
	name := fields.OneTermEqualSelector("metadata.name", cluster.JWKSConfigMap).String()
	c.jwks = coreinformers.NewFilteredConfigMapInformer(cs, opts.Namespace, 0, cache.Indexers{}, func(o *metav1.ListOptions) {
		o.FieldSelector = name
	})
	for _, inf := range []cache.SharedIndexInformer{c.ctbs, c.jwks} {
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { c.refresh() },
			UpdateFunc: func(any, any) { c.refresh() },
			DeleteFunc: func(any) { c.refresh() },
		}); err != nil {
			return nil, fmt.Errorf("clusterca: %w", err)
		}
	}
	return c, nil
}

// Run watches the ClusterTrustBundle and the JWKS ConfigMap until ctx is
// done; then it returns nil.
func (c *Client) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for _, inf := range []cache.SharedIndexInformer{c.ctbs, c.jwks} {
		wg.Go(func() { inf.RunWithContext(ctx) })
	}
	defer wg.Wait()
	if !cache.WaitForCacheSync(ctx.Done(), c.ctbs.HasSynced, c.jwks.HasSynced) {
		return nil
	}
	c.mu.Lock()
	c.synced = true
	c.mu.Unlock()
	c.refresh()
	<-ctx.Done()
	return nil
}

// Trust returns the roots of every matching ClusterTrustBundle and the keys
// of the JWKS ConfigMap; ok is false until both were listed.
func (c *Client) Trust() (ca.Trust, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.trust, c.synced
}

// Changed is closed at the next change of Trust.
func (c *Client) Changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// refresh rebuilds the trust from the informers' stores.
func (c *Client) refresh() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.synced {
		return // Run refreshes once both are listed
	}
	var roots []*x509.Certificate
	var rev uint64
	for _, o := range c.ctbs.GetStore().List() {
		ctb, ok := o.(*certv1.ClusterTrustBundle)
		if !ok {
			continue
		}
		rev = max(rev, resourceRevision(ctb.ResourceVersion))
		certs, err := ca.ParseCertificatesPEM([]byte(ctb.Spec.TrustBundle))
		if err != nil {
			klog.ErrorS(err, "ClusterTrustBundle not used", "cluster_trust_bundle", ctb.Name)
			continue
		}
		roots = appendNew(roots, certs...)
	}
	keys := c.trust.JWTKeys
	switch objs := c.jwks.GetStore().List(); len(objs) {
	case 0:
		keys, c.jwksRV = nil, ""
	default:
		cm, _ := objs[0].(*corev1.ConfigMap)
		if cm != nil {
			rev = max(rev, resourceRevision(cm.ResourceVersion))
		}
		if cm == nil || cm.ResourceVersion == c.jwksRV {
			break
		}
		c.jwksRV = cm.ResourceVersion
		data, present := cm.Data[cluster.JWKSKey]
		if !present {
			keys = nil
			break
		}
		parsed, err := cluster.ParseJWKS([]byte(data))
		if err != nil {
			klog.ErrorS(err, "JWKS ConfigMap does not parse; keeping the last good keys",
				"configmap", cm.Namespace+"/"+cm.Name, "resource_version", cm.ResourceVersion)
			break
		}
		keys = parsed
	}
	next := ca.Trust{Roots: roots, JWTKeys: keys}
	c.rev = max(c.rev, rev)
	if c.told && sameTrust(c.trust, next) {
		return
	}
	c.trust, c.told = next, true
	close(c.changed)
	c.changed = make(chan struct{})
}

func appendNew(list []*x509.Certificate, certs ...*x509.Certificate) []*x509.Certificate {
	for _, n := range certs {
		dup := false
		for _, o := range list {
			dup = dup || o.Equal(n)
		}
		if !dup {
			list = append(list, n)
		}
	}
	return list
}

func sameTrust(a, b ca.Trust) bool {
	if len(a.Roots) != len(b.Roots) || len(a.JWTKeys) != len(b.JWTKeys) {
		return false
	}
	for i := range a.Roots {
		if !a.Roots[i].Equal(b.Roots[i]) {
			return false
		}
	}
	for i, k := range a.JWTKeys {
		o := b.JWTKeys[i]
		if k.KeyID != o.KeyID || k.Node != o.Node || !k.NotAfter.Equal(o.NotAfter) {
			return false
		}
	}
	return true
}

// SignIntermediate asks IntermediateSigner for a CA certificate.
func (c *Client) SignIntermediate(ctx context.Context, csrDER []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	return c.request(ctx, c.opts.IntermediateSigner, csrDER, ttl,
		[]certv1.KeyUsage{certv1.UsageCertSign, certv1.UsageCRLSign})
}

// RegisterJWTKey asks JWTKeySigner to publish a JWT-SVID key.
func (c *Client) RegisterJWTKey(ctx context.Context, csrDER []byte, ttl time.Duration) (*x509.Certificate, error) {
	certs, err := c.request(ctx, c.opts.JWTKeySigner, csrDER, ttl, []certv1.KeyUsage{certv1.UsageDigitalSignature})
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

// request creates a CSR and watches it until it is issued, denied or
// failed, or ctx ends.
func (c *Client) request(ctx context.Context, signer string, csrDER []byte, ttl time.Duration, usages []certv1.KeyUsage) ([]*x509.Certificate, error) {
	secs := int32(max(ttl, minExpiration) / time.Second)
	csr, err := c.cs.CertificatesV1().CertificateSigningRequests().Create(ctx, &certv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "csi-agent-" + c.opts.NodeName + "-"},
		Spec: certv1.CertificateSigningRequestSpec{
			Request:           pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER}),
			SignerName:        signer,
			Usages:            usages,
			ExpirationSeconds: &secs,
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("clusterca: create CertificateSigningRequest for %s: %w", signer, err)
	}
	klog.InfoS("Requested a certificate", "csr", csr.Name, "signer", signer, "ttl", ttl)
	csrs := c.cs.CertificatesV1().CertificateSigningRequests()
	byName := fields.OneTermEqualSelector("metadata.name", csr.Name).String()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = byName
			return csrs.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = byName
			return csrs.Watch(ctx, o)
		},
	}
	var certs []*x509.Certificate
	_, err = watchtools.UntilWithSync(ctx, lw, &certv1.CertificateSigningRequest{}, nil, func(ev watch.Event) (bool, error) {
		if ev.Type == watch.Deleted {
			return false, fmt.Errorf("CertificateSigningRequest %s was deleted before it was issued", csr.Name)
		}
		o, ok := ev.Object.(*certv1.CertificateSigningRequest)
		if !ok {
			return false, nil
		}
		for _, cond := range o.Status.Conditions {
			if (cond.Type == certv1.CertificateDenied || cond.Type == certv1.CertificateFailed) && cond.Status == corev1.ConditionTrue {
				return false, fmt.Errorf("CertificateSigningRequest %s %s (%s): %s", o.Name, cond.Type, cond.Reason, cond.Message)
			}
		}
		if len(o.Status.Certificate) == 0 {
			return false, nil
		}
		var err error
		if certs, err = ca.ParseCertificatesPEM(o.Status.Certificate); err != nil {
			return false, fmt.Errorf("CertificateSigningRequest %s: status.certificate: %w", o.Name, err)
		}
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("clusterca: %w", err)
	}
	klog.InfoS("Certificate issued", "csr", csr.Name, "signer", signer,
		"serial", certs[0].SerialNumber.Text(16), "expires", certs[0].NotAfter.UTC().Format(time.RFC3339))
	return certs, nil
}
