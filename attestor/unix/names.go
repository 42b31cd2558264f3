package unix

import (
	"bytes"
	"fmt"
	"github.com/csi-agent/csi-agent/internal/fsutil"
	"strconv"
	"sync"
	"time"

	sysunix "golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// maxNameFileSize bounds what is read of /etc/passwd or /etc/group.
const maxNameFileSize = 64 << 20

// fileKey identifies one version of a file. ctime is in it because mtime
// can be set back by the file's owner; ctime can not.
type fileKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // ns since the epoch
}

func keyOf(st *sysunix.Stat_t) fileKey {
	return fileKey{
		dev:   uint64(st.Dev),
		ino:   uint64(st.Ino),
		size:  int64(st.Size),
		mtime: st.Mtim.Nano(),
		ctime: st.Ctim.Nano(),
	}
}

// racyWindow: a file whose ctime is this recent may change again without its
// ctime moving (coarse timestamps), so its key does not yet identify its
// content and nothing derived from it is cached.
const racyWindow = time.Second

func (k fileKey) racy(now time.Time) bool {
	return k.ctime >= now.Add(-racyWindow).UnixNano()
}

// recheckInterval: how long a settled passwd or group file is trusted
// without a stat; a user renamed on the host shows up within it.
const recheckInterval = time.Second

// nameFile maps ids to names from a passwd- or group-format file, re-read
// whenever the file changes.
type nameFile struct {
	path string

	mu      sync.Mutex
	key     fileKey
	cached  bool
	checked time.Time // last stat that found the file unchanged
	names   map[uint32]string
	lastErr string
}

// snapshot returns the current id → name map (nil when the file can not be
// read). The map is never modified after it is returned.
func (f *nameFile) snapshot() map[uint32]string {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cached && now.Sub(f.checked) < recheckInterval && now.After(f.checked) {
		return f.names
	}
	var st sysunix.Stat_t
	serr := sysunix.Stat(f.path, &st)
	if serr != nil {
		f.fail(fmt.Errorf("stat: %w", serr))
		return nil
	}
	key := keyOf(&st)
	if f.cached && key == f.key {
		f.checked = now
		return f.names
	}
	// The key was taken before reading, so a change during the read shows
	// up as a new key next time.
	b, err := fsutil.ReadFileLimited(f.path, maxNameFileSize)
	if err != nil {
		f.fail(err)
		return nil
	}
	f.names = parseIDNames(b)
	f.key = key
	f.cached = !key.racy(now)
	f.checked = now
	f.lastErr = ""
	return f.names
}

// fail forgets the names and logs each new error once: names then go absent,
// which can only take attributes away.
func (f *nameFile) fail(err error) {
	f.names, f.cached = nil, false
	if msg := err.Error(); msg != f.lastErr {
		f.lastErr = msg
		klog.ErrorS(err, "Cannot read id names; user and group names are left out", "path", f.path)
	}
}

// parseIDNames parses passwd ("name:pw:uid:...") or group ("name:pw:gid:...")
// lines into id → name. Like getpwuid, the first entry of an id wins.
// Comments, NIS "+"/"-" entries and malformed lines are skipped.
func parseIDNames(b []byte) map[uint32]string {
	names := make(map[uint32]string)
	for line := range bytes.Lines(b) {
		line = bytes.TrimSuffix(line, []byte{'\n'})
		if len(line) == 0 || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		name, rest, ok := bytes.Cut(line, []byte{':'})
		if !ok || len(name) == 0 {
			continue
		}
		_, rest, ok = bytes.Cut(rest, []byte{':'}) // password
		if !ok {
			continue
		}
		idField, _, _ := bytes.Cut(rest, []byte{':'})
		id, err := strconv.ParseUint(string(idField), 10, 32)
		if err != nil {
			continue
		}
		if _, dup := names[uint32(id)]; !dup {
			names[uint32(id)] = string(name)
		}
	}
	return names
}
