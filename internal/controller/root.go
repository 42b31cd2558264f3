package controller

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/controller/issue"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

func (c *Controller) rootPolicy() rootca.Policy {
	return rootca.Policy{ActivationDelay: c.o.RootActivationDelay, Retain: c.o.RetainPrevious}
}

// runRoot reconciles the root at each planned step, when the Secret
// changes and every RootPoll.
func (c *Controller) runRoot(ctx context.Context, changed <-chan struct{}) error {
	for {
		wait := c.o.RootPoll
		if s, ok := c.holder.State(); ok {
			if at := rootca.Wake(s); !at.IsZero() {
				wait = min(wait, max(at.Sub(c.o.Now()), 0))
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		case <-changed:
			t.Stop()
		}
		if err := c.reconcileRoot(ctx); err != nil && ctx.Err() == nil {
			klog.ErrorS(err, "Root CA reconcile failed; keeping the current root", "secret", c.o.RootSecret)
		}
	}
}

// reconcileRoot reads (or makes) the root Secret, moves the rotation on,
// writes back what changed, and publishes the roots.
func (c *Controller) reconcileRoot(ctx context.Context) error {
	secrets := c.client.CoreV1().Secrets(c.o.Namespace)
	sec, err := secrets.Get(ctx, c.o.RootSecret, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		sec, err = c.createRoot(ctx)
	}
	if err != nil {
		return fmt.Errorf("root secret %s/%s: %w", c.o.Namespace, c.o.RootSecret, err)
	}
	st, err := rootca.Decode(sec.Data, sec.Annotations)
	if err != nil {
		return fmt.Errorf("%s/%s: %w", c.o.Namespace, c.o.RootSecret, err)
	}
	now := c.o.Now()
	if st.Managed {
		next, changed, err := rootca.Step(st, now, c.rootPolicy(), func() (issue.Parent, error) {
			return issue.Root(c.o.TrustDomain, c.o.Now(), c.o.RootTTL)
		})
		if err != nil {
			return err
		}
		if next.Next != nil && (st.Next == nil || !next.Next.Cert.Equal(st.Next.Cert)) {
			// A new next root: published first, its delay counted from
			// then, so that every agent has had the delay to see it.
			if err := c.publishBundle(ctx, next.Bundle()); err != nil {
				return err
			}
			next.NextActivates = c.o.Now().Add(c.o.RootActivationDelay)
		}
		if changed {
			if err := c.writeRoot(ctx, sec, next); err != nil {
				return err
			}
			logRoot("Root CA rotation step", next)
		}
		st = next
	} else {
		prev, loaded := c.holder.State()
		if loaded && !prev.Managed {
			var adopted bool
			if st, adopted = rootca.Adopt(prev, st.Current, now, c.rootPolicy()); adopted {
				if err := c.publishBundle(ctx, st.Bundle()); err != nil {
					return err
				}
				st.NextActivates = c.o.Now().Add(c.o.RootActivationDelay)
			}
		} else {
			var published bool
			if st.Previous, published, err = c.publishedRoots(ctx, st.Current); err != nil {
				return err
			}
			if len(st.Previous) > 0 {
				// A new leader does not know what the last one trusted: keep
				// what is published as long as anything it signed may live.
				st.PreviousUntil = now.Add(c.o.RetainPrevious)
				if !published {
					// The user's root changed while no replica led: what
					// it signs waits until relying parties have it.
					st.SignsFrom = now.Add(c.o.RootActivationDelay)
					klog.InfoS("Root CA not yet published; publishing it, signing after the activation delay",
						"secret", c.o.RootSecret, "serial", st.Current.Cert.SerialNumber.Text(16), "signs_from", st.SignsFrom.UTC().Format(time.RFC3339))
				}
			}
		}
		st, _, _ = rootca.Step(st, now, c.rootPolicy(), nil)
	}
	// Publish before the holder signs with a root that may be new.
	if err := c.publishBundle(ctx, st.Bundle()); err != nil {
		return err
	}
	c.holder.Set(st)
	return nil
}

func logRoot(msg string, s rootca.State) {
	klog.InfoS(msg, "serial", s.Current.Cert.SerialNumber.Text(16), "expires", s.Current.Cert.NotAfter.UTC().Format(time.RFC3339),
		"next", s.Next != nil, "previous", len(s.Previous))
}

// createRoot makes a managed root Secret. Create, never overwrite: another
// leader (or the user) may have made it meanwhile; then that one is read.
func (c *Controller) createRoot(ctx context.Context) (*corev1.Secret, error) {
	root, err := issue.Root(c.o.TrustDomain, c.o.Now(), c.o.RootTTL)
	if err != nil {
		return nil, err
	}
	data, ann, err := rootca.State{Current: root, Managed: true}.Encode()
	if err != nil {
		return nil, err
	}
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: c.o.RootSecret, Namespace: c.o.Namespace, Annotations: map[string]string{}},
		Type:       corev1.SecretTypeTLS,
		Data:       data,
	}
	setAnnotations(&sec.ObjectMeta, ann)
	created, err := c.client.CoreV1().Secrets(c.o.Namespace).Create(ctx, sec, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return c.client.CoreV1().Secrets(c.o.Namespace).Get(ctx, c.o.RootSecret, metav1.GetOptions{})
	}
	if err != nil {
		return nil, err
	}
	klog.InfoS("Root CA created", "secret", c.o.RootSecret, "serial", root.Cert.SerialNumber.Text(16), "expires", root.Cert.NotAfter.UTC().Format(time.RFC3339))
	return created, nil
}

// writeRoot stores s in sec; a conflict fails the step, retried from a fresh read.
func (c *Controller) writeRoot(ctx context.Context, sec *corev1.Secret, s rootca.State) error {
	data, ann, err := s.Encode()
	if err != nil {
		return err
	}
	sec = sec.DeepCopy()
	sec.Data = data
	setAnnotations(&sec.ObjectMeta, ann)
	if _, err := c.client.CoreV1().Secrets(c.o.Namespace).Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update root secret: %w", err)
	}
	return nil
}

// setAnnotations sets ann on m; a key mapped to "" is removed.
func setAnnotations(m *metav1.ObjectMeta, ann map[string]string) {
	if m.Annotations == nil {
		m.Annotations = map[string]string{}
	}
	for k, v := range ann {
		if v == "" {
			delete(m.Annotations, k)
		} else {
			m.Annotations[k] = v
		}
	}
}

func (c *Controller) bundleName() string {
	return cluster.TrustBundleName(c.o.SVIDSigner, c.o.TrustDomain)
}

// publishedRoots are the unexpired roots in the ClusterTrustBundle other
// than current, and whether current is there too.
func (c *Controller) publishedRoots(ctx context.Context, current issue.Parent) (others []*x509.Certificate, hasCurrent bool, err error) {
	ctb, err := c.client.CertificatesV1().ClusterTrustBundles().Get(ctx, c.bundleName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("cluster trust bundle %s: %w", c.bundleName(), err)
	}
	certs, err := ca.ParseCertificatesPEM([]byte(ctb.Spec.TrustBundle))
	if err != nil {
		klog.ErrorS(err, "Published trust bundle does not parse; replacing it", "name", c.bundleName())
		return nil, false, nil
	}
	now := c.o.Now()
	for _, crt := range certs {
		switch {
		case bytes.Equal(crt.Raw, current.Cert.Raw):
			hasCurrent = true
		case now.Before(crt.NotAfter):
			others = append(others, crt)
		}
	}
	return others, hasCurrent, nil
}

// publishBundle makes the ClusterTrustBundle hold exactly certs.
func (c *Controller) publishBundle(ctx context.Context, certs []*x509.Certificate) error {
	want := string(rootca.EncodeCertificates(certs))
	ctbs := c.client.CertificatesV1().ClusterTrustBundles()
	td := c.o.TrustDomain.Name()
	ctb, err := ctbs.Get(ctx, c.bundleName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = ctbs.Create(ctx, &certv1.ClusterTrustBundle{
			ObjectMeta: metav1.ObjectMeta{Name: c.bundleName(), Labels: map[string]string{cluster.TrustDomainLabel: td}},
			Spec:       certv1.ClusterTrustBundleSpec{SignerName: c.o.SVIDSigner, TrustBundle: want},
		}, metav1.CreateOptions{})
		if err == nil {
			klog.InfoS("Trust bundle published", "name", c.bundleName(), "roots", len(certs))
		}
		return err
	}
	if err != nil {
		return fmt.Errorf("cluster trust bundle %s: %w", c.bundleName(), err)
	}
	if ctb.Spec.TrustBundle == want && ctb.Labels[cluster.TrustDomainLabel] == td {
		return nil
	}
	ctb = ctb.DeepCopy()
	ctb.Spec.TrustBundle = want
	if ctb.Labels == nil {
		ctb.Labels = map[string]string{}
	}
	ctb.Labels[cluster.TrustDomainLabel] = td
	if _, err := ctbs.Update(ctx, ctb, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update cluster trust bundle %s: %w", c.bundleName(), err)
	}
	klog.InfoS("Trust bundle updated", "name", c.bundleName(), "roots", len(certs))
	return nil
}
