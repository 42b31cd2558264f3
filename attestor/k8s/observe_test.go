package k8s

import (
	"context"
	"testing"
	"time"
)

func TestKubeletClientObserve(t *testing.T) {
	k := startKubelet(t, standInOptions{})
	k.setPods(withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", cidN(1)))
	var errs []error
	c := mustClient(t, KubeletConfig{NodeName: "node-a", ReadOnlyPort: k.port(), Observe: func(err error, d time.Duration) {
		if d <= 0 {
			t.Errorf("duration %v", d)
		}
		errs = append(errs, err)
	}})
	listOK(t, c)
	k.stop()
	if _, err := c.ListPods(context.Background()); err == nil {
		t.Fatal("a stopped kubelet answered")
	}
	if len(errs) != 2 || errs[0] != nil || errs[1] == nil {
		t.Fatalf("observed %v, want [nil, an error]", errs)
	}
}
