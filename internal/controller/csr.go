package controller

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	certlisters "k8s.io/client-go/listers/certificates/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/controller/csrcheck"
	"github.com/csi-agent/csi-agent/internal/controller/issue"
	"github.com/csi-agent/csi-agent/internal/controller/jwks"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

// CSR results (metric label values).
const (
	ResultApproved = "approved"
	ResultDenied   = "denied"
	ResultIssued   = "issued"
	ResultFailed   = "failed"
)

type csrWorker struct {
	c           *Controller
	queue       workqueue.TypedRateLimitingInterface[string]
	listers     []certlisters.CertificateSigningRequestLister
	nodes       corelisters.NodeLister
	recorder    record.EventRecorder
	jwksChanged func()
	// stale maps a CSR to the resource version our last write replaced.
	stale sync.Map
}

func (w *csrWorker) enqueue(obj any) {
	if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
		w.queue.Add(key)
	}
}

func (w *csrWorker) nodeExists(name string) bool {
	_, err := w.nodes.Get(name)
	return !apierrors.IsNotFound(err)
}

func (w *csrWorker) run(ctx context.Context) {
	for {
		key, quit := w.queue.Get()
		if quit {
			return
		}
		var notYet *rootca.NotSigningError
		if err := w.process(ctx, key); errors.As(err, &notYet) && ctx.Err() == nil {
			// Looked at again once the root signs, not before.
			klog.V(1).InfoS("CSR waits for the root's activation", "csr", key, "signs_from", notYet.Until.UTC().Format(time.RFC3339))
			w.queue.Forget(key)
			w.queue.AddAfter(key, max(notYet.Until.Sub(w.c.o.Now()), 0))
		} else if err != nil && ctx.Err() == nil {
			if apierrors.IsConflict(err) {
				klog.V(2).InfoS("CSR changed meanwhile; retrying", "csr", key)
			} else {
				klog.ErrorS(err, "CSR not handled; retrying", "csr", key)
			}
			w.queue.AddRateLimited(key)
		} else {
			w.queue.Forget(key)
		}
		w.queue.Done(key)
	}
}

func (w *csrWorker) get(name string) *certv1.CertificateSigningRequest {
	for _, l := range w.listers {
		if csr, err := l.Get(name); err == nil {
			return csr
		}
	}
	return nil
}

func kindLabel(k csrcheck.Kind) string {
	if k == csrcheck.KindJWTKey {
		return "jwt-key"
	}
	return "intermediate"
}

// process answers one CSR: decides it when pending, signs it when approved
// and not signed yet. Every step is repeatable: a retry after a crash does
// the rest.
func (w *csrWorker) process(ctx context.Context, name string) error {
	csr := w.get(name)
	if csr == nil {
		w.stale.Delete(name)
		return nil
	}
	if rv, ok := w.stale.Load(name); ok {
		if rv != "" && rv == csr.ResourceVersion {
			// The cache has not seen our last write yet; its event brings
			// the CSR back.
			return nil
		}
		w.stale.Delete(name)
	}
	if s := csr.Spec.SignerName; s != w.c.o.IntermediateSigner && s != w.c.o.JWTKeySigner {
		// Another signer's CSR (the field selector keeps them out; this
		// guards against a cache that ignored it): never ours to answer.
		return nil
	}
	approved, done := conditions(csr)
	if done || (approved && len(csr.Status.Certificate) > 0) {
		return nil
	}
	d, err := csrcheck.Decide(csr, w.nodes.Get, w.c.policy)
	if err != nil {
		return err
	}
	kind := kindLabel(d.Kind)
	csrs := w.c.client.CertificatesV1().CertificateSigningRequests()
	if !approved {
		csr = csr.DeepCopy()
		if !d.Approve {
			csr.Status.Conditions = append(csr.Status.Conditions, condition(certv1.CertificateDenied, cluster.ReasonDenied, d.Message))
			if _, err := csrs.UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{}); err != nil {
				return fmt.Errorf("deny: %w", err)
			}
			w.stale.Store(csr.Name, csr.ResourceVersion)
			w.c.o.Metrics.CSR(kind, ResultDenied)
			w.c.o.Metrics.CSRDenied(d.Reason)
			w.recorder.Event(csr, corev1.EventTypeWarning, "Denied", d.Message)
			klog.InfoS("CSR denied", "csr", csr.Name, "node", d.Node, "reason", d.Reason, "message", d.Message)
			return nil
		}
		msg := fmt.Sprintf("node %s verified: %s", d.Node, d.ID)
		csr.Status.Conditions = append(csr.Status.Conditions, condition(certv1.CertificateApproved, cluster.ReasonApproved, msg))
		old := csr.ResourceVersion
		if csr, err = csrs.UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("approve: %w", err)
		}
		w.stale.Store(csr.Name, old)
		w.c.o.Metrics.CSR(kind, ResultApproved)
		w.recorder.Event(csr, corev1.EventTypeNormal, "Approved", msg)
	} else if !d.Approve {
		// Someone else approved what the checks refuse: it is not signed.
		csr = csr.DeepCopy()
		csr.Status.Conditions = append(csr.Status.Conditions, condition(certv1.CertificateFailed, cluster.ReasonDenied, "not signed: "+d.Message))
		if _, err := csrs.UpdateStatus(ctx, csr, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("mark failed: %w", err)
		}
		w.stale.Store(csr.Name, csr.ResourceVersion)
		w.c.o.Metrics.CSR(kind, ResultFailed)
		w.c.o.Metrics.CSRDenied(d.Reason)
		w.recorder.Event(csr, corev1.EventTypeWarning, "Failed", d.Message)
		return nil
	}
	return w.sign(ctx, csr, d)
}

// sign issues what d approved and stores it in the CSR's status.
func (w *csrWorker) sign(ctx context.Context, csr *certv1.CertificateSigningRequest, d csrcheck.Decision) error {
	root, err := w.c.holder.Current()
	if err != nil {
		return err
	}
	now := w.c.o.Now()
	var crt *x509.Certificate
	switch d.Kind {
	case csrcheck.KindIntermediate:
		crt, err = issue.Intermediate(root, d.Public, w.c.o.TrustDomain, d.ID, now, d.TTL)
	case csrcheck.KindJWTKey:
		crt, err = issue.Receipt(root, d.Public, d.ID, now, d.TTL)
		if err == nil {
			err = w.register(ctx, d, crt.NotAfter)
		}
	}
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	csr = csr.DeepCopy()
	csr.Status.Certificate = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: crt.Raw})
	if _, err := w.c.client.CertificatesV1().CertificateSigningRequests().UpdateStatus(ctx, csr, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("store certificate: %w", err)
	}
	w.stale.Store(csr.Name, csr.ResourceVersion)
	w.c.o.Metrics.CSR(kindLabel(d.Kind), ResultIssued)
	klog.InfoS("CSR signed", "csr", csr.Name, "spiffe_id", d.ID.String(), "serial", crt.SerialNumber.Text(16),
		"expires", crt.NotAfter.UTC().Format(time.RFC3339), "kind", kindLabel(d.Kind))
	return nil
}

// register adds the node's JWT key to the JWKS before the agent learns it
// was accepted, so it is published by the time the agent signs with it.
func (w *csrWorker) register(ctx context.Context, d csrcheck.Decision, notAfter time.Time) error {
	kid, err := cluster.KeyID(d.Public)
	if err != nil {
		return err
	}
	k := cluster.JWTKey{Node: d.Node, KeyID: kid, Public: d.Public, NotAfter: notAfter}
	err = w.c.keys.update(ctx, func(keys []cluster.JWTKey) ([]cluster.JWTKey, bool) { return jwks.Add(keys, k) })
	if err != nil {
		return fmt.Errorf("publish JWT key: %w", err)
	}
	w.jwksChanged()
	return nil
}

// conditions reports whether csr is approved, and whether it is settled
// (denied or failed) and needs nothing more.
func conditions(csr *certv1.CertificateSigningRequest) (approved, done bool) {
	for _, c := range csr.Status.Conditions {
		switch c.Type {
		case certv1.CertificateApproved:
			approved = true
		case certv1.CertificateDenied, certv1.CertificateFailed:
			done = true
		}
	}
	return approved, done
}

func condition(t certv1.RequestConditionType, reason, msg string) certv1.CertificateSigningRequestCondition {
	now := metav1.Now()
	return certv1.CertificateSigningRequestCondition{
		Type: t, Status: corev1.ConditionTrue, Reason: reason, Message: msg,
		LastUpdateTime: now, LastTransitionTime: now,
	}
}
