// Package leader runs work only while this replica holds the controller's
// Lease (client-go leader election), and gives the Lease up when it stops.
package leader

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

// Options configure the election.
type Options struct {
	Namespace, Lease, Identity                string
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// OnLeader, if set, is told when this replica starts and stops leading.
	OnLeader func(leading bool)
}

// Task is leader-only work: it runs until ctx ends; an error ends the term.
type Task func(ctx context.Context) error

// Run campaigns for the Lease until ctx ends. While leading it runs every
// task; when leadership is lost it stops them, waits, and campaigns again.
// A task's error stops the others, releases the Lease and is returned. At
// the end of ctx the tasks stop first and the Lease is released after, so
// the next leader never overlaps with this one's writes.
func Run(ctx context.Context, client kubernetes.Interface, o Options, tasks ...Task) error {
	lock, err := resourcelock.New(resourcelock.LeasesResourceLock, o.Namespace, o.Lease,
		client.CoreV1(), client.CoordinationV1(), resourcelock.ResourceLockConfig{Identity: o.Identity})
	if err != nil {
		return fmt.Errorf("leader: lock: %w", err)
	}
	onLeader := o.OnLeader
	if onLeader == nil {
		onLeader = func(bool) {}
	}
	for {
		err := runTerm(ctx, lock, o, onLeader, tasks)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return err
		}
		klog.InfoS("Leadership lost; campaigning again", "lease", o.Lease, "identity", o.Identity)
	}
}

// runTerm campaigns once and, if elected, leads until the term ends.
func runTerm(ctx context.Context, lock resourcelock.Interface, o Options, onLeader func(bool), tasks []Task) error {
	// The elector's context is not ctx: it ends only once the tasks have
	// stopped, which is when ReleaseOnCancel gives the Lease up.
	electCtx, stopElect := context.WithCancel(context.Background())
	defer stopElect()
	var (
		mu      sync.Mutex
		started bool
		done    = make(chan struct{})
		taskErr error
	)
	stopWatch := context.AfterFunc(ctx, func() {
		mu.Lock()
		s := started
		mu.Unlock()
		if !s {
			stopElect()
		}
	})
	defer stopWatch()
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		Name:            o.Lease,
		LeaseDuration:   o.LeaseDuration,
		RenewDeadline:   o.RenewDeadline,
		RetryPeriod:     o.RetryPeriod,
		ReleaseOnCancel: true,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(lctx context.Context) {
				mu.Lock()
				started = true
				mu.Unlock()
				defer close(done)
				defer stopElect()
				klog.InfoS("Leading", "lease", o.Lease, "identity", o.Identity)
				onLeader(true)
				tctx, cancel := context.WithCancel(lctx)
				defer cancel()
				stop := context.AfterFunc(ctx, cancel)
				defer stop()
				taskErr = runTasks(tctx, tasks)
			},
			OnStoppedLeading: func() { onLeader(false) },
		},
	})
	if err != nil {
		return fmt.Errorf("leader: %w", err)
	}
	le.Run(electCtx)
	mu.Lock()
	s := started
	mu.Unlock()
	if s {
		<-done
	}
	return taskErr
}

// runTasks runs every task until ctx ends or one fails.
func runTasks(ctx context.Context, tasks []Task) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, t := range tasks {
		g.Go(func() error {
			if err := t(ctx); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		})
	}
	return g.Wait()
}
