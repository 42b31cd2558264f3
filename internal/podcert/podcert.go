// Package podcert signs Kubernetes PodCertificateRequests addressed to our
// signer (cluster.SVIDSigner by default) with X.509-SVIDs: the kubelet of a
// pod with a podCertificate projected volume creates the request, this
// controller checks it against the API, evaluates the same SVID rules as the
// node agents on the pod's attributes and issues, or denies with a reason
// the kubelet shows in the pod's events. It runs on the elected controller
// only; see README.md for what is checked and which keys are accepted.
package podcert

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	certinformers "k8s.io/client-go/informers/certificates/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	k8sattestor "github.com/csi-agent/csi-agent/attestor/k8s"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// Signer issues an X.509-SVID for pub: the chain leaf first, without the
// root. The leaf's lifetime (NotAfter-NotBefore) must not exceed ttl; the
// signer may make it shorter (the root's NotAfter).
type Signer interface {
	SignSVID(ctx context.Context, pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, ttl time.Duration) ([]*x509.Certificate, error)
}

// Options configure a Controller.
type Options struct {
	// SignerName is the spec.signerName we sign; empty means cluster.SVIDSigner.
	SignerName string
	// TrustDomain of the SVIDs (required).
	TrustDomain spiffeid.TrustDomain
	// Rules are the SVID rules, the agents' own (required; SetRules replaces them).
	Rules *rules.Set
	// Signer is the trust domain's CA (required).
	Signer Signer
	// MaxTTL caps the lifetime below the request's maxExpirationSeconds; 0
	// leaves only the request's bound (and the root's NotAfter).
	MaxTTL time.Duration
	// RefreshFraction of the lifetime after which the kubelet begins to
	// refresh; 0 means one half.
	RefreshFraction float64
	// Workers process requests concurrently; 0 means 2.
	Workers int
	// Clock is for tests; nil means the real clock.
	Clock clock.PassiveClock
}

// Controller signs PodCertificateRequests. Create it with New.
type Controller struct {
	client kubernetes.Interface
	opts   Options
	rules  atomic.Pointer[rules.Set]
}

// run is one Run's informer and queue: an informer cannot be started twice,
// and leadership can be won again.
type run struct {
	*Controller
	informer cache.SharedIndexInformer
	queue    workqueue.TypedRateLimitingInterface[string]
}

// New checks opts; nothing talks to the API until Run.
func New(client kubernetes.Interface, opts Options) (*Controller, error) {
	if client == nil {
		return nil, errors.New("podcert: no Kubernetes client")
	}
	if opts.SignerName == "" {
		opts.SignerName = cluster.SVIDSigner
	}
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("podcert: trust domain is empty")
	}
	if opts.Rules == nil {
		return nil, errors.New("podcert: no rules")
	}
	if opts.Signer == nil {
		return nil, errors.New("podcert: no signer")
	}
	if opts.MaxTTL < 0 || (opts.MaxTTL > 0 && opts.MaxTTL < MinLifetime) {
		return nil, fmt.Errorf("podcert: max TTL %s is under the API minimum lifetime of %s", opts.MaxTTL, MinLifetime)
	}
	if opts.RefreshFraction == 0 {
		opts.RefreshFraction = 0.5
	}
	if opts.RefreshFraction <= 0 || opts.RefreshFraction >= 1 {
		return nil, fmt.Errorf("podcert: refresh fraction %v is not in (0, 1)", opts.RefreshFraction)
	}
	if opts.Workers <= 0 {
		opts.Workers = 2
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	c := &Controller{client: client, opts: opts}
	c.rules.Store(opts.Rules)
	return c, nil
}

// SetRules replaces the rules for requests decided from now on.
func (c *Controller) SetRules(set *rules.Set) {
	if set != nil {
		c.rules.Store(set)
	}
}

// Run signs until ctx ends; call it only while leading.
func (c *Controller) Run(ctx context.Context) error {
	selector := fields.OneTermEqualSelector("spec.signerName", c.opts.SignerName).String()
	r := &run{
		Controller: c,
		informer: certinformers.NewFilteredPodCertificateRequestInformer(c.client, metav1.NamespaceAll, 0, cache.Indexers{},
			func(o *metav1.ListOptions) { o.FieldSelector = selector }),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "podcertificaterequests"}),
	}
	defer r.queue.ShutDown()
	reg, err := r.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    r.enqueue,
		UpdateFunc: func(_, obj any) { r.enqueue(obj) },
	})
	if err != nil {
		return fmt.Errorf("podcert: watch PodCertificateRequests: %w", err)
	}
	defer func() { _ = r.informer.RemoveEventHandler(reg) }()
	go r.informer.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), reg.HasSynced) {
		return nil // ctx ended before the first list
	}
	klog.InfoS("Signing PodCertificateRequests", "signer", c.opts.SignerName, "trust_domain", c.opts.TrustDomain)
	done := make(chan struct{})
	for range c.opts.Workers {
		go func() {
			defer func() { done <- struct{}{} }()
			for r.next(ctx) {
			}
		}()
	}
	<-ctx.Done()
	r.queue.ShutDown()
	for range c.opts.Workers {
		<-done
	}
	return nil
}

func (r *run) enqueue(obj any) {
	pcr, ok := obj.(*certv1.PodCertificateRequest)
	if !ok || pcr.Spec.SignerName != r.opts.SignerName || terminal(pcr) {
		return
	}
	key, err := cache.MetaNamespaceKeyFunc(pcr)
	if err != nil {
		utilruntime.HandleError(err)
		return
	}
	r.queue.Add(key)
}

func (r *run) next(ctx context.Context) bool {
	key, quit := r.queue.Get()
	if quit {
		return false
	}
	defer r.queue.Done(key)
	if err := r.sync(ctx, key); err != nil {
		if ctx.Err() == nil {
			klog.ErrorS(err, "PodCertificateRequest not decided; retrying", "request", key)
		}
		r.queue.AddRateLimited(key)
		return true
	}
	r.queue.Forget(key)
	return true
}

// sync decides one request. An error means "try again later" (the API was
// unreachable); every decision is written as a condition.
func (r *run) sync(ctx context.Context, key string) error {
	obj, exists, err := r.informer.GetIndexer().GetByKey(key)
	if err != nil || !exists {
		return err
	}
	pcr := obj.(*certv1.PodCertificateRequest)
	if terminal(pcr) {
		return nil
	}
	status, v, err := r.decide(ctx, pcr)
	if err != nil {
		return err
	}
	return r.writeStatus(ctx, pcr, status, v)
}

// decide returns the status of an issued certificate, or the verdict.
func (c *Controller) decide(ctx context.Context, pcr *certv1.PodCertificateRequest) (certv1.PodCertificateRequestStatus, *verdict, error) {
	var none certv1.PodCertificateRequestStatus
	req, v := parseRequest(&pcr.Spec)
	if v != nil {
		return none, v, nil
	}
	o, err := c.fetch(ctx, pcr)
	if err != nil {
		return none, nil, err
	}
	if v := checkObjects(pcr, c.opts.SignerName, o); v != nil {
		return none, v, nil
	}
	attrs, err := k8sattestor.PodAttributes(o.pod)
	if err != nil {
		return none, failed(ReasonSigningFailed, "reading pod attributes: %v", err), nil
	}
	who := fmt.Sprintf("pod %s/%s (service account %s, node %s)", pcr.Namespace, pcr.Spec.PodName, pcr.Spec.ServiceAccountName, pcr.Spec.NodeName)
	id, v := chooseIdentity(c.rules.Load(), c.opts.TrustDomain, attrs, req.hint, who)
	if v != nil {
		return none, v, nil
	}
	ttl, v := ttlFor(req.maxLifetime, c.opts.MaxTTL)
	if v != nil {
		return none, v, nil
	}
	chain, err := c.opts.Signer.SignSVID(ctx, req.pub, id.ID, id.DNSNames, ttl)
	if err != nil {
		// Retried, not Failed: the kubelet gives up on a Failed request, and
		// the usual cause (no root loaded yet, just after election) passes.
		return none, nil, fmt.Errorf("sign %s: %w", id.ID, err)
	}
	if v := checkChain(chain, req.pub, id.ID, req.maxLifetime); v != nil {
		return none, v, nil
	}
	leaf := chain[0]
	var pemChain strings.Builder
	for _, cert := range chain {
		_ = pem.Encode(&pemChain, &pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	}
	klog.InfoS("PodCertificateRequest issued", "request", klog.KObj(pcr), "pod", klog.KRef(pcr.Namespace, pcr.Spec.PodName),
		"spiffe_id", id.ID, "serial", leaf.SerialNumber.Text(16), "expires", leaf.NotAfter.UTC().Format(time.RFC3339))
	return certv1.PodCertificateRequestStatus{
		Conditions: []metav1.Condition{{
			Type: certv1.PodCertificateRequestConditionTypeIssued, Status: metav1.ConditionTrue,
			Reason: ReasonIssued, Message: "issued " + id.ID.String(),
		}},
		CertificateChain: pemChain.String(),
		NotBefore:        &metav1.Time{Time: leaf.NotBefore},
		BeginRefreshAt:   &metav1.Time{Time: refreshAt(leaf.NotBefore, leaf.NotAfter, c.opts.RefreshFraction)},
		NotAfter:         &metav1.Time{Time: leaf.NotAfter},
	}, nil, nil
}

// fetch reads the pod, node and service account from the API server (not
// a cache: a replaced object must not pass on a stale copy).
func (c *Controller) fetch(ctx context.Context, pcr *certv1.PodCertificateRequest) (objects, error) {
	var o objects
	var err error
	if o.pod, err = orNil(c.client.CoreV1().Pods(pcr.Namespace).Get(ctx, pcr.Spec.PodName, metav1.GetOptions{})); err != nil {
		return o, fmt.Errorf("get pod %s/%s: %w", pcr.Namespace, pcr.Spec.PodName, err)
	}
	if o.node, err = orNil(c.client.CoreV1().Nodes().Get(ctx, string(pcr.Spec.NodeName), metav1.GetOptions{})); err != nil {
		return o, fmt.Errorf("get node %s: %w", pcr.Spec.NodeName, err)
	}
	if o.sa, err = orNil(c.client.CoreV1().ServiceAccounts(pcr.Namespace).Get(ctx, pcr.Spec.ServiceAccountName, metav1.GetOptions{})); err != nil {
		return o, fmt.Errorf("get service account %s/%s: %w", pcr.Namespace, pcr.Spec.ServiceAccountName, err)
	}
	return o, nil
}

// orNil turns NotFound into a nil object.
func orNil[T any](obj *T, err error) (*T, error) {
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return obj, nil
}

// writeStatus records the decision. A conflict means the request changed;
// it is queued again and decided afresh (or found decided).
func (c *Controller) writeStatus(ctx context.Context, pcr *certv1.PodCertificateRequest, status certv1.PodCertificateRequestStatus, v *verdict) error {
	now := metav1.NewTime(c.opts.Clock.Now())
	if v != nil {
		status = certv1.PodCertificateRequestStatus{Conditions: []metav1.Condition{{
			Type: v.Type, Status: metav1.ConditionTrue, Reason: v.Reason, Message: v.Message,
		}}}
	}
	for i := range status.Conditions {
		status.Conditions[i].LastTransitionTime = now
		status.Conditions[i].ObservedGeneration = pcr.Generation
	}
	upd := pcr.DeepCopy()
	upd.Status = status
	_, err := c.client.CertificatesV1().PodCertificateRequests(pcr.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil // the kubelet gave up on it
	case apierrors.IsConflict(err):
		return nil // changed meanwhile: the watch brings the new version, decided afresh
	case err != nil:
		return fmt.Errorf("update status of PodCertificateRequest %s/%s: %w", pcr.Namespace, pcr.Name, err)
	}
	if v != nil {
		klog.InfoS("PodCertificateRequest refused", "request", klog.KObj(pcr), "pod", klog.KRef(pcr.Namespace, pcr.Spec.PodName),
			"condition", v.Type, "reason", v.Reason, "message", v.Message)
	}
	return nil
}

// terminal reports whether the request is already issued, denied or failed.
func terminal(pcr *certv1.PodCertificateRequest) bool {
	for _, cnd := range pcr.Status.Conditions {
		switch cnd.Type {
		case certv1.PodCertificateRequestConditionTypeIssued,
			certv1.PodCertificateRequestConditionTypeDenied,
			certv1.PodCertificateRequestConditionTypeFailed:
			return cnd.Status == metav1.ConditionTrue
		}
	}
	return false
}
