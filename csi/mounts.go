package csi

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/moby/sys/mountinfo"
)

// source is the Workload API socket directory as the mount table shows it: a
// bind mount of it has the same device and the same root. Reading identity
// off the table (not stat) never touches other mounts, which may hang.
type source struct {
	major, minor int
	root         string
}

// sourceOf finds the mount holding the resolved path dir and returns how a
// bind mount of dir appears in the table.
func sourceOf(table []*mountinfo.Info, dir string) (source, error) {
	best := holder(table, dir)
	if best == nil {
		return source{}, fmt.Errorf("no mount holds %s", dir)
	}
	rel, err := filepath.Rel(best.Mountpoint, dir)
	if err != nil {
		return source{}, fmt.Errorf("locate %s in mount %s: %w", dir, best.Mountpoint, err)
	}
	return source{major: best.Major, minor: best.Minor, root: filepath.Join(best.Root, rel)}, nil
}

// holder returns the visible mount that the resolved path lies in: the
// deepest mount point above it, its top layer when stacked.
func holder(table []*mountinfo.Info, path string) *mountinfo.Info {
	var best *mountinfo.Info
	for _, m := range table {
		if !isUnder(path, m.Mountpoint) {
			continue
		}
		if best == nil || len(m.Mountpoint) > len(best.Mountpoint) ||
			(m.Mountpoint == best.Mountpoint && m.Parent == best.ID) {
			best = m
		}
	}
	return best
}

// isUnder reports whether path is dir or below it.
func isUnder(path, dir string) bool {
	if dir == "/" {
		return strings.HasPrefix(path, "/")
	}
	return path == dir || strings.HasPrefix(path, dir+"/")
}

func (s source) sameDevice(m *mountinfo.Info) bool {
	return m.Major == s.major && m.Minor == s.minor
}

// owns reports whether m is a bind mount of the socket directory.
func (s source) owns(m *mountinfo.Info) bool {
	return s.sameDevice(m) && m.Root == s.root
}

// ownsStale reports whether m is a bind mount of a socket directory that has
// since been deleted (the kernel marks its root "//deleted"): the pod behind
// it can no longer reach the Workload API.
func (s source) ownsStale(m *mountinfo.Info) bool {
	return s.sameDevice(m) && m.Root == s.root+"//deleted"
}

// layersAt returns the mounts stacked at mountpoint, in table order.
func layersAt(table []*mountinfo.Info, mountpoint string) []*mountinfo.Info {
	var out []*mountinfo.Info
	for _, m := range table {
		if m.Mountpoint == mountpoint {
			out = append(out, m)
		}
	}
	return out
}

// top returns the visible layer: the one no other layer is mounted on.
func top(layers []*mountinfo.Info) *mountinfo.Info {
	for _, m := range layers {
		covered := false
		for _, o := range layers {
			if o.Parent == m.ID && o != m {
				covered = true
				break
			}
		}
		if !covered {
			return m
		}
	}
	if len(layers) == 0 {
		return nil
	}
	return layers[len(layers)-1]
}

// bottom returns the first layer: the one mounted on no other layer.
func bottom(layers []*mountinfo.Info) *mountinfo.Info {
	for _, m := range layers {
		onLayer := false
		for _, o := range layers {
			if m.Parent == o.ID && o != m {
				onLayer = true
				break
			}
		}
		if !onLayer {
			return m
		}
	}
	if len(layers) == 0 {
		return nil
	}
	return layers[0]
}

// requiredOpts are the per-mount options every published target must carry.
var requiredOpts = []string{"ro", "nosuid", "nodev", "noexec"}

func hasOpts(m *mountinfo.Info, want []string) bool {
	have := strings.Split(m.Options, ",")
	for _, w := range want {
		found := false
		for _, h := range have {
			if h == w {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// mountState is what a target holds.
type mountState int

const (
	stateUnmounted  mountState = iota
	stateOurs                  // exactly one read-only bind mount of the socket dir
	stateOursBroken            // only socket dir mounts, but stacked, stale or not read-only
	stateForeign               // something else is mounted there
)

// classify tells what the target's layers are, with a reason when not stateOurs.
func classify(layers []*mountinfo.Info, src source) (mountState, string) {
	if len(layers) == 0 {
		return stateUnmounted, "the target is not mounted"
	}
	for _, m := range layers {
		if !src.owns(m) && !src.ownsStale(m) {
			return stateForeign, fmt.Sprintf("the target is mounted from %s (%s%s), not from the Workload API socket directory", m.Source, m.FSType, m.Root)
		}
	}
	t := top(layers)
	switch {
	case len(layers) > 1:
		return stateOursBroken, fmt.Sprintf("the socket directory is mounted %d times at the target", len(layers))
	case src.ownsStale(t):
		return stateOursBroken, "the socket directory mounted at the target was deleted; restart the pod"
	case !hasOpts(t, requiredOpts):
		return stateOursBroken, fmt.Sprintf("the mount at the target has options %q, not %s", t.Options, strings.Join(requiredOpts, ","))
	}
	return stateOurs, ""
}
