package k8s

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
)

// maxCgroupSize bounds a /proc/<pid>/cgroup read. A process in a delegated
// subtree picks its cgroup path, so the file is not small by nature.
const maxCgroupSize = 1 << 20

// ParseCgroup finds the pod UID and container ID in the contents of
// /proc/<pid>/cgroup as the agent sees it (host view). An empty podUID with a
// nil error means the process is not in a pod. containerID is empty when the
// process sits in a pod's cgroup but not in a container cgroup we recognise;
// the pod-level facts still hold for it.
//
// Every line is read (cgroup v1 controllers, named hierarchies and the v2
// "0::" line); lines that disagree are an error, never a guess. In each path
// only the outermost pod segment counts, and only the segment right after it
// is the container: a container allowed to create sub-cgroups controls every
// name below its own, so nothing there is trusted.
//
// A pod UID is returned in its API form: lowercase 8-4-4-4-12 hex, or 32
// lowercase hex for static pods (the kubelet names those by a config hash).
// A container ID is 64 lowercase hex.
func ParseCgroup(data []byte) (podUID, containerID string, err error) {
	lineNo := 0
	for line := range bytes.Lines(data) {
		line = bytes.TrimSuffix(line, []byte{'\n'})
		lineNo++
		if len(line) == 0 {
			continue
		}
		uid, cid, err := parseCgroupLine(string(line))
		if err != nil {
			return "", "", fmt.Errorf("cgroup line %d: %w", lineNo, err)
		}
		if uid == "" {
			continue
		}
		if podUID != "" && uid != podUID {
			return "", "", fmt.Errorf("cgroup line %d: pod UID %s conflicts with %s on an earlier line", lineNo, uid, podUID)
		}
		podUID = uid
		if cid != "" {
			if containerID != "" && cid != containerID {
				return "", "", fmt.Errorf("cgroup line %d: container ID %s conflicts with %s on an earlier line", lineNo, cid, containerID)
			}
			containerID = cid
		}
	}
	return podUID, containerID, nil
}

var errMalformedLine = errors.New("not hierarchy-ID:controllers:path")

// parseCgroupLine reads one "hierarchy-ID:controller-list:cgroup-path" line.
func parseCgroupLine(line string) (podUID, containerID string, err error) {
	id, rest, ok := strings.Cut(line, ":")
	if !ok || id == "" || !allDigits(id) {
		return "", "", errMalformedLine
	}
	// The path keeps any further colons (containerd's "slice:prefix:id").
	_, path, ok := strings.Cut(rest, ":")
	if !ok || !strings.HasPrefix(path, "/") {
		return "", "", errMalformedLine
	}
	return parseCgroupPath(path)
}

// parseCgroupPath finds the pod in a cgroup path. The pod segment must sit
// where the kubelet puts pods: right under the kubepods root or one of its
// QoS children, after only the prefixes a node can add (cgroup-namespace
// "..", kind's node container, kind's "kubelet" root). Anyone with a
// delegated cgroup subtree (a user session, rootless containers) can create
// a directory named like a pod; one found anywhere else is an error, never
// an answer.
func parseCgroupPath(path string) (podUID, containerID string, err error) {
	var segs []string
	for _, seg := range strings.Split(path, "/") {
		if seg != "" {
			segs = append(segs, seg)
		}
	}
	i, ups := 0, 0
	for i < len(segs) && segs[i] == ".." {
		i++
		ups++
	}
	if ups == 0 {
		i = skipNodePrefix(segs, i)
	}
	if i < len(segs) && isKubepodsRoot(segs[i]) {
		i++
	}
	if i < len(segs) && isQoSSegment(segs[i]) {
		i++
	}
	if i < len(segs) {
		uid, inlineCID, isPod, err := parsePodSegment(segs[i])
		if err != nil {
			return "", "", err
		}
		if isPod {
			if inlineCID != "" {
				return uid, inlineCID, nil
			}
			if i+1 < len(segs) {
				return uid, parseContainerSegment(segs[i+1]), nil
			}
			return uid, "", nil
		}
	}
	for _, seg := range segs {
		if _, _, isPod, _ := parsePodSegment(seg); isPod {
			return "", "", fmt.Errorf("pod-like cgroup %q outside the kubepods hierarchy in %q", seg, path)
		}
	}
	return "", "", nil
}

// skipNodePrefix passes over the cgroups of a node that is itself a
// container (kind): /docker/<id>, /system.slice/docker-<id>.scope, then
// the kubelet's own root, /kubelet or /kubelet.slice.
func skipNodePrefix(segs []string, i int) int {
	switch {
	case i+1 < len(segs) && segs[i] == "docker" && isContainerID(segs[i+1]):
		i += 2
	case i+1 < len(segs) && segs[i] == "system.slice" && isDockerScope(segs[i+1]):
		i += 2
	}
	if i < len(segs) && (segs[i] == "kubelet" || segs[i] == "kubelet.slice") {
		i++
	}
	return i
}

func isDockerScope(seg string) bool {
	id, ok := strings.CutPrefix(seg, "docker-")
	if !ok {
		return false
	}
	id, ok = strings.CutSuffix(id, ".scope")
	return ok && isContainerID(id)
}

func isKubepodsRoot(seg string) bool {
	switch seg {
	case "kubepods", "kubepods.slice", "kubelet-kubepods.slice":
		return true
	}
	return false
}

func isQoSSegment(seg string) bool {
	switch seg {
	case "burstable", "besteffort",
		"kubepods-burstable.slice", "kubepods-besteffort.slice",
		"kubelet-kubepods-burstable.slice", "kubelet-kubepods-besteffort.slice":
		return true
	}
	return false
}

// parsePodSegment recognises a pod cgroup name:
//
//	pod<uid>                                         cgroupfs driver
//	kubepods-<qos>-pod<uid_with_underscores>.slice   systemd driver (also kubelet-kubepods-… in kind)
//	kubepods-<qos>-pod<uid_>.slice:<runtime>:<id>    containerd's systemd cgroupsPath notation
//
// A segment shaped like a pod cgroup whose UID is not valid is an error.
func parsePodSegment(seg string) (podUID, containerID string, isPod bool, err error) {
	if slice, rest, ok := strings.Cut(seg, ":"); ok {
		uid, isPod, err := parseSystemdPodSlice(slice)
		if err != nil || !isPod {
			return "", "", false, err
		}
		_, id, ok := strings.Cut(rest, ":")
		if !ok || !isContainerID(id) {
			return "", "", false, fmt.Errorf("pod cgroup %q: no container ID after the slice", seg)
		}
		return uid, id, true, nil
	}
	if strings.HasSuffix(seg, ".slice") {
		uid, isPod, err := parseSystemdPodSlice(seg)
		return uid, "", isPod, err
	}
	rest, ok := strings.CutPrefix(seg, "pod")
	if !ok || rest == "" || !onlyChars(rest, isHexOrDash) {
		return "", "", false, nil
	}
	uid, ok := canonicalPodUID(rest, '-')
	if !ok {
		return "", "", false, fmt.Errorf("pod cgroup %q: malformed pod UID", seg)
	}
	return uid, "", true, nil
}

func parseSystemdPodSlice(seg string) (podUID string, isPod bool, err error) {
	name, ok := strings.CutSuffix(seg, ".slice")
	if !ok || !strings.Contains(name, "kubepods") {
		return "", false, nil
	}
	i := strings.LastIndex(name, "-pod")
	if i < 0 {
		return "", false, nil
	}
	rest := name[i+len("-pod"):]
	if rest == "" || !onlyChars(rest, isHexOrUnderscore) {
		return "", false, nil
	}
	// systemd reserves '-' for nesting, so the kubelet writes the UID's dashes as '_'.
	uid, ok := canonicalPodUID(rest, '_')
	if !ok {
		return "", false, fmt.Errorf("pod cgroup %q: malformed pod UID", seg)
	}
	return uid, true, nil
}

// canonicalPodUID accepts 8-4-4-4-12 lowercase hex separated by sep, or 32
// lowercase hex, and returns it with '-' separators.
func canonicalPodUID(s string, sep byte) (string, bool) {
	switch len(s) {
	case 32:
		if onlyChars(s, isLowerHex) {
			return s, true
		}
	case 36:
		b := []byte(s)
		for i, c := range b {
			switch i {
			case 8, 13, 18, 23:
				if c != sep {
					return "", false
				}
				b[i] = '-'
			default:
				if !isLowerHex(c) {
					return "", false
				}
			}
		}
		return string(b), true
	}
	return "", false
}

// parseContainerSegment recognises the container cgroup names of containerd,
// CRI-O and Docker under both drivers. Anything else (crio-conmon-…, a future
// runtime) yields "": the caller is still in the pod, just not in a container
// we can name.
func parseContainerSegment(seg string) string {
	name := strings.TrimSuffix(seg, ".scope")
	for _, prefix := range []string{"cri-containerd-", "crio-", "docker-"} {
		if id, ok := strings.CutPrefix(name, prefix); ok {
			name = id
			break
		}
	}
	if isContainerID(name) {
		return name
	}
	return ""
}

func isContainerID(s string) bool {
	return len(s) == 64 && onlyChars(s, isLowerHex)
}

func onlyChars(s string, ok func(byte) bool) bool {
	for i := 0; i < len(s); i++ {
		if !ok(s[i]) {
			return false
		}
	}
	return true
}

func allDigits(s string) bool {
	return onlyChars(s, func(c byte) bool { return c >= '0' && c <= '9' })
}

func isLowerHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f'
}

func isHexOrDash(c byte) bool       { return isLowerHex(c) || c == '-' }
func isHexOrUnderscore(c byte) bool { return isLowerHex(c) || c == '_' }
