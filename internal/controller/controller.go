// Package controller is the csi-agent controller's leader work: it keeps
// the trust domain's root CA (rootca), publishes it in a ClusterTrustBundle,
// answers node agents' CSRs (csrcheck, issue) and keeps the JWKS ConfigMap
// of node JWT keys (jwks). Every replica also serves OIDC discovery (oidc)
// from the ConfigMap (KeyWatcher); leader runs the leader-only part.
package controller

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/controller/csrcheck"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

// Options configure the controller; internal/config fills every field.
type Options struct {
	TrustDomain spiffeid.TrustDomain
	// Namespace holds RootSecret and JWKSConfigMap.
	Namespace     string
	RootSecret    string
	JWKSConfigMap string

	IntermediateSigner, JWTKeySigner, SVIDSigner string
	// AgentServiceAccounts are "namespace:name" of the node agents.
	AgentServiceAccounts []string

	RootTTL                time.Duration
	RootActivationDelay    time.Duration
	MaxIntermediateTTL     time.Duration
	DefaultIntermediateTTL time.Duration
	// RetainPrevious is how long a replaced root stays published: the
	// longest life of what it signed (intermediates, and pod certificates
	// when those are signed too); 0 means MaxIntermediateTTL.
	RetainPrevious time.Duration
	// RootPoll is how often the root Secret is read (for the rotate
	// annotation and a user's new root); the controller may not watch it.
	RootPoll time.Duration
	// Workers process CSRs concurrently.
	Workers int

	// Holder, if set, is the root holder to fill (shared with other
	// leader-only signers); otherwise New makes one.
	Holder  *rootca.Holder
	Metrics Metrics
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// Metrics is what the controller counts.
type Metrics interface {
	// CSR counts a CSR outcome by kind (intermediate, jwt-key) and result
	// (approved, denied, issued, failed).
	CSR(kind, result string)
	// CSRDenied counts a denial by reason (a csrcheck.Reason* value).
	CSRDenied(reason string)
}

type noMetrics struct{}

func (noMetrics) CSR(string, string) {}
func (noMetrics) CSRDenied(string)   {}

// Controller is the leader-only work. Make it with New, run it with Run.
type Controller struct {
	client kubernetes.Interface
	o      Options
	holder *rootca.Holder
	policy csrcheck.Policy
	keys   *keyStore
}

// New checks o and returns the controller.
func New(client kubernetes.Interface, o Options) (*Controller, error) {
	switch {
	case o.TrustDomain.IsZero():
		return nil, errors.New("controller: no trust domain")
	case o.Namespace == "" || o.RootSecret == "" || o.JWKSConfigMap == "":
		return nil, errors.New("controller: namespace, root secret and JWKS config map are required")
	case o.IntermediateSigner == "" || o.JWTKeySigner == "" || o.SVIDSigner == "":
		return nil, errors.New("controller: signer names are required")
	case o.RootTTL <= 0 || o.RootActivationDelay < 0 || o.MaxIntermediateTTL <= 0 || o.DefaultIntermediateTTL <= 0 || o.RootPoll <= 0:
		return nil, errors.New("controller: durations must be positive")
	case len(o.AgentServiceAccounts) == 0:
		return nil, errors.New("controller: no agent service accounts")
	}
	if o.Workers <= 0 {
		o.Workers = 1
	}
	if o.RetainPrevious < o.MaxIntermediateTTL {
		o.RetainPrevious = o.MaxIntermediateTTL
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Metrics == nil {
		o.Metrics = noMetrics{}
	}
	if o.Holder == nil {
		o.Holder = rootca.NewHolder(o.TrustDomain, o.Now)
	}
	return &Controller{
		client: client,
		o:      o,
		holder: o.Holder,
		policy: csrcheck.Policy{
			TrustDomain:          o.TrustDomain,
			IntermediateSigner:   o.IntermediateSigner,
			JWTKeySigner:         o.JWTKeySigner,
			AgentServiceAccounts: o.AgentServiceAccounts,
			DefaultTTL:           o.DefaultIntermediateTTL,
			MaxTTL:               o.MaxIntermediateTTL,
		},
		keys: &keyStore{client: client, namespace: o.Namespace, name: o.JWKSConfigMap, td: o.TrustDomain},
	}, nil
}

// Holder is the root holder: it signs workload SVIDs while this replica
// leads (rootca.Holder.SignSVID).
func (c *Controller) Holder() *rootca.Holder { return c.holder }

// Backoff of the first root load.
const (
	loadRetryMin = time.Second
	loadRetryMax = 30 * time.Second
)

// loadRoot reconciles the root until it succeeds (the API may be briefly
// away, or the user's Secret being fixed); false when ctx ends first.
func (c *Controller) loadRoot(ctx context.Context) bool {
	wait := loadRetryMin
	for {
		err := c.reconcileRoot(ctx)
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		klog.ErrorS(err, "Root CA not loaded; nothing is signed until it is", "secret", c.o.RootSecret, "retry_in", wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
		wait = min(2*wait, loadRetryMax)
	}
}

// resync re-lists now and then, so a CSR whose retries were dropped is
// looked at again.
const resync = 10 * time.Minute

// Run does the leader's work until ctx ends: root first (loaded or made,
// published), then CSRs and the JWKS. Run it only while leading.
func (c *Controller) Run(ctx context.Context) error {
	defer c.holder.Clear()
	if !c.loadRoot(ctx) {
		return nil // ctx ended
	}

	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "csi-agent-controller"})

	nodeFactory := informers.NewSharedInformerFactory(c.client, resync)
	nodes := nodeFactory.Core().V1().Nodes()
	queue := workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "csi-agent-csr"})
	defer queue.ShutDown()
	prune := make(chan struct{}, 1)
	poke := func() {
		select {
		case prune <- struct{}{}:
		default:
		}
	}
	if _, err := nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		DeleteFunc: func(any) { poke() },
	}); err != nil {
		return fmt.Errorf("controller: node informer: %w", err)
	}
	w := &csrWorker{c: c, queue: queue, nodes: nodes.Lister(), recorder: recorder, jwksChanged: poke}
	// The root Secret, watched by name: a rotate annotation or a user's new
	// root is seen at once. Not waited for: without list and watch (RBAC of
	// an older deployment) the RootPoll reads still see every change.
	rootChanged := make(chan struct{}, 1)
	secretFactory := informers.NewSharedInformerFactoryWithOptions(c.client, resync, informers.WithNamespace(c.o.Namespace),
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
			lo.FieldSelector = fields.OneTermEqualSelector("metadata.name", c.o.RootSecret).String()
		}))
	wakeRoot := func(any) {
		select {
		case rootChanged <- struct{}{}:
		default:
		}
	}
	if _, err := secretFactory.Core().V1().Secrets().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: wakeRoot, UpdateFunc: func(_, obj any) { wakeRoot(obj) }, DeleteFunc: wakeRoot,
	}); err != nil {
		return fmt.Errorf("controller: root secret informer: %w", err)
	}
	factories := []informers.SharedInformerFactory{nodeFactory, secretFactory}
	var synced []cache.InformerSynced
	for _, signer := range []string{c.o.IntermediateSigner, c.o.JWTKeySigner} {
		f := informers.NewSharedInformerFactoryWithOptions(c.client, resync, informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
			lo.FieldSelector = fields.OneTermEqualSelector("spec.signerName", signer).String()
		}))
		inf := f.Certificates().V1().CertificateSigningRequests()
		w.listers = append(w.listers, inf.Lister())
		if _, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    w.enqueue,
			UpdateFunc: func(_, obj any) { w.enqueue(obj) },
			DeleteFunc: w.enqueue, // forgets what it kept of the CSR
		}); err != nil {
			return fmt.Errorf("controller: CSR informer: %w", err)
		}
		synced = append(synced, inf.Informer().HasSynced)
		factories = append(factories, f)
	}
	synced = append(synced, nodes.Informer().HasSynced)
	for _, f := range factories {
		f.Start(ctx.Done())
	}
	defer func() {
		for _, f := range factories {
			f.Shutdown()
		}
	}()
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil // ctx ended
	}
	klog.InfoS("Controller leading", "trust_domain", c.o.TrustDomain.String(), "expires", c.holder.Expiry().UTC().Format(time.RFC3339))

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.runRoot(ctx, rootChanged) })
	g.Go(func() error { return c.runPrune(ctx, prune, w.nodeExists) })
	for range c.o.Workers {
		g.Go(func() error { w.run(ctx); return nil })
	}
	g.Go(func() error { <-ctx.Done(); queue.ShutDown(); return nil })
	return g.Wait()
}
