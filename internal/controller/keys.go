package controller

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/controller/jwks"
)

// keyStore reads and writes the JWKS ConfigMap (leader only).
type keyStore struct {
	client          kubernetes.Interface
	namespace, name string
	td              spiffeid.TrustDomain
	mu              sync.Mutex // one writer at a time among the workers
}

// update applies fn to the published keys and writes the result when fn
// reports a change. It reads from the API, not a cache, and retries on a
// conflict.
func (s *keyStore) update(ctx context.Context, fn func([]cluster.JWTKey) ([]cluster.JWTKey, bool)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cms := s.client.CoreV1().ConfigMaps(s.namespace)
	return retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		cm, err := cms.Get(ctx, s.name, metav1.GetOptions{})
		create := apierrors.IsNotFound(err)
		if err != nil && !create {
			return err
		}
		var keys []cluster.JWTKey
		if create {
			cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: s.namespace}}
		} else if data := cm.Data[cluster.JWKSKey]; data != "" {
			if keys, err = cluster.ParseJWKS([]byte(data)); err != nil {
				// Left as is, it would block every registration; agents
				// register again at half life.
				klog.ErrorS(err, "JWKS ConfigMap does not parse; starting it afresh", "name", s.name)
				keys = nil
			}
		}
		out, changed := fn(keys)
		if !changed && !create {
			return nil
		}
		data, err := cluster.MarshalJWKS(out)
		if err != nil {
			return err
		}
		cm = cm.DeepCopy()
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[cluster.JWKSKey] = string(data)
		if cm.Labels == nil {
			cm.Labels = map[string]string{}
		}
		cm.Labels[cluster.TrustDomainLabel] = s.td.Name()
		if create {
			_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				return apierrors.NewConflict(corev1.Resource("configmaps"), s.name, err)
			}
			return err
		}
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		return err
	})
}

// maxPruneWait bounds the sleep between prunes (a missed node deletion is
// caught by then).
const maxPruneWait = time.Hour

// runPrune removes expired keys when the first expires and the keys of
// deleted nodes when a node goes (poked).
func (c *Controller) runPrune(ctx context.Context, poked <-chan struct{}, nodeExists func(string) bool) error {
	for {
		var next time.Time
		err := c.keys.update(ctx, func(keys []cluster.JWTKey) ([]cluster.JWTKey, bool) {
			out, changed := jwks.Prune(keys, c.o.Now(), nodeExists)
			if changed {
				klog.InfoS("JWKS pruned", "removed", len(keys)-len(out), "kept", len(out))
			}
			next = jwks.NextExpiry(out)
			return out, changed
		})
		wait := maxPruneWait
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			klog.ErrorS(err, "JWKS prune failed; retrying", "name", c.o.JWKSConfigMap)
			wait = 10 * time.Second
		} else if !next.IsZero() {
			wait = min(wait, max(next.Sub(c.o.Now()), 0)+time.Second)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-poked:
			t.Stop()
		case <-t.C:
		}
	}
}

// KeyWatcher follows the JWKS ConfigMap (one watch, field selector on its
// name) for OIDC discovery; every replica runs one.
type KeyWatcher struct {
	factory informers.SharedInformerFactory
	synced  cache.InformerSynced
	mu      sync.RWMutex
	keys    []cluster.JWTKey
}

// NewKeyWatcher watches namespace/name.
func NewKeyWatcher(client kubernetes.Interface, namespace, name string) (*KeyWatcher, error) {
	w := &KeyWatcher{factory: informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
			lo.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))}
	inf := w.factory.Core().V1().ConfigMaps().Informer()
	set := func(obj any) {
		cm, ok := obj.(*corev1.ConfigMap)
		if !ok {
			return
		}
		keys, err := cluster.ParseJWKS([]byte(cm.Data[cluster.JWKSKey]))
		if err != nil && cm.Data[cluster.JWKSKey] != "" {
			klog.ErrorS(err, "JWKS ConfigMap does not parse; keeping the keys served", "name", name)
			return
		}
		w.mu.Lock()
		w.keys = keys
		w.mu.Unlock()
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    set,
		UpdateFunc: func(_, obj any) { set(obj) },
		DeleteFunc: func(any) {
			w.mu.Lock()
			w.keys = nil
			w.mu.Unlock()
		},
	}); err != nil {
		return nil, fmt.Errorf("controller: JWKS informer: %w", err)
	}
	w.synced = inf.HasSynced
	return w, nil
}

// Run watches until ctx ends.
func (w *KeyWatcher) Run(ctx context.Context) error {
	w.factory.Start(ctx.Done())
	<-ctx.Done()
	w.factory.Shutdown()
	return nil
}

// Synced reports whether the first list has arrived.
func (w *KeyWatcher) Synced() bool { return w.synced() }

// Keys are the published keys.
func (w *KeyWatcher) Keys() []cluster.JWTKey {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.keys
}
