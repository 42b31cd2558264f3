// Package socketalias keeps more names for a Unix socket: symbolic links in
// the socket's directory to its file name, as SPIRE's chart offers
// (socket, api.sock beside spire-agent.sock). The links are relative, so
// they resolve wherever the directory is mounted (a pod's CSI volume).
package socketalias

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/klog/v2"
)

// Options configure New.
type Options struct {
	// Dir is the socket's directory, Target the socket's file name in it.
	Dir, Target string
	// Names are the aliases: plain file names in Dir (internal/config
	// validates them).
	Names []string
	// Poll is how often Run checks the links.
	Poll time.Duration
}

// Aliases are the links New made; Run keeps them and removes them at the end.
type Aliases struct {
	opts Options
}

// New makes every alias. A name taken by anything but a symbolic link
// (someone's file or socket) is refused, not replaced; a link is made to
// point at Target.
func New(opts Options) (*Aliases, error) {
	if opts.Dir == "" || opts.Target == "" || opts.Poll <= 0 || strings.ContainsRune(opts.Target, '/') {
		return nil, errors.New("socketalias: need a directory, a target file name and a poll interval")
	}
	a := &Aliases{opts: opts}
	for _, n := range opts.Names {
		if _, err := a.ensure(n); err != nil {
			a.remove()
			return nil, err
		}
	}
	return a, nil
}

// Run re-makes an alias that was deleted or changed, like the socket
// itself is re-made, until ctx ends; then it removes the aliases that
// still point at Target.
func (a *Aliases) Run(ctx context.Context) error {
	if a == nil || len(a.opts.Names) == 0 {
		return nil
	}
	tick := time.NewTicker(a.opts.Poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			a.remove()
			return nil
		case <-tick.C:
		}
		for _, n := range a.opts.Names {
			path := filepath.Join(a.opts.Dir, n)
			made, err := a.ensure(n)
			switch {
			case err != nil:
				klog.ErrorS(err, "Re-creating the socket alias failed; will retry", "path", path)
			case made:
				klog.InfoS("Re-created the socket alias", "path", path, "socket", filepath.Join(a.opts.Dir, a.opts.Target))
			}
		}
	}
}

// ensure makes the alias name point at Target; made tells it had to.
func (a *Aliases) ensure(name string) (made bool, err error) {
	path := filepath.Join(a.opts.Dir, name)
	if cur, err := os.Readlink(path); err == nil && cur == a.opts.Target {
		return false, nil
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSymlink == 0 {
		return false, fmt.Errorf("socket alias %s: exists and is not a symbolic link (%s); refusing to replace it", path, fi.Mode().Type())
	}
	// Made under a hidden name and renamed into place: a client never
	// sees the name missing or half made.
	tmp := filepath.Join(a.opts.Dir, "."+name+".tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(a.opts.Target, tmp); err != nil {
		return false, fmt.Errorf("socket alias %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return false, fmt.Errorf("socket alias %s: %w", path, err)
	}
	return true, nil
}

// remove takes away the aliases that still point at Target.
func (a *Aliases) remove() {
	for _, n := range a.opts.Names {
		path := filepath.Join(a.opts.Dir, n)
		if cur, err := os.Readlink(path); err == nil && cur == a.opts.Target {
			_ = os.Remove(path)
		}
	}
}
