package csi

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// csiVolumesDir is where the kubelet puts every CSI volume of a pod:
// <kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount.
// Other volume plugins' directories (emptyDir, ...) can be written by the
// pod itself, so targets there are never accepted.
const csiVolumesDir = "kubernetes.io~csi"

// splitTarget checks, without touching the file system, that target is an
// absolute, clean path <root>/pods/<uid>/volumes/kubernetes.io~csi/<...> and
// returns the pod UID and the path relative to root.
func splitTarget(root, target string) (podUID, rel string, err error) {
	if !filepath.IsAbs(target) {
		return "", "", invalidf("target path %q is not absolute", target)
	}
	for _, seg := range strings.Split(target, "/")[1:] {
		if seg == ".." || seg == "." {
			return "", "", invalidf("target path %q contains %q: refusing to leave the kubelet directory", target, seg)
		}
	}
	if filepath.Clean(target) != target {
		return "", "", invalidf("target path %q is not a clean path", target)
	}
	prefix := root + "/"
	if root == "/" {
		prefix = "/"
	}
	rel, ok := strings.CutPrefix(target, prefix)
	if !ok {
		return "", "", invalidf("target path %q is not under the kubelet directory %s", target, filepath.Join(root, "pods"))
	}
	segs := strings.Split(rel, "/")
	if len(segs) < 5 || segs[0] != "pods" || segs[2] != "volumes" || segs[3] != csiVolumesDir {
		return "", "", invalidf("target path %q is not a CSI volume path %s/pods/<pod uid>/volumes/%s/<volume>/...", target, root, csiVolumesDir)
	}
	if !podUIDRE.MatchString(segs[1]) {
		return "", "", invalidf("target path %q: %q is not a pod UID", target, segs[1])
	}
	return segs[1], rel, nil
}

// target is a target path that passed the checks.
type target struct {
	given  string // as the kubelet sent it; the records key
	real   string // the same place with the kubelet root's symlinks resolved
	podUID string
	exists bool
}

// resolveTarget checks target lexically and then walks it below the kubelet
// root without following any symlink: the kubelet root itself may be a
// symlink, nothing below it may.
func (d *Driver) resolveTarget(given string) (target, error) {
	realRoot, err := filepath.EvalSymlinks(d.kubeletRoot)
	if err != nil {
		return target{}, fmt.Errorf("resolve kubelet root dir: %w", err)
	}
	podUID, rel, err := splitTarget(d.kubeletRoot, given)
	if err != nil && realRoot != d.kubeletRoot {
		// The kubelet may have been given the resolved root.
		if uid, r, err2 := splitTarget(realRoot, given); err2 == nil {
			podUID, rel, err = uid, r, nil
		}
	}
	if err != nil {
		return target{}, err
	}
	real, exists, err := walkNoSymlinks(realRoot, rel)
	if err != nil {
		return target{}, err
	}
	return target{given: given, real: real, podUID: podUID, exists: exists}, nil
}

// walkNoSymlinks joins rel to root one segment at a time, refusing symlinks
// and non-directories. exists is false when some segment does not exist yet.
func walkNoSymlinks(root, rel string) (path string, exists bool, err error) {
	path = root
	segs := strings.Split(rel, "/")
	for i, seg := range segs {
		path = filepath.Join(path, seg)
		fi, err := os.Lstat(path)
		if errors.Is(err, fs.ErrNotExist) {
			return filepath.Join(root, rel), false, nil
		}
		if err != nil {
			return "", false, fmt.Errorf("inspect %s: %w", path, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			return "", false, invalidf("target path goes through the symlink %s: refusing to follow symlinks below the kubelet directory", path)
		}
		if !fi.IsDir() {
			if i == len(segs)-1 {
				return "", false, invalidf("target path %s exists and is not a directory", path)
			}
			return "", false, invalidf("target path goes through %s, which is not a directory", path)
		}
	}
	return path, true, nil
}
