// Package records keeps the durable record of every CSI publish: which pod
// (UID, namespace, name, service account) got the Workload API socket mounted
// at which target. The Kubernetes attestor cross-checks callers against it.
//
// Records live in an append-only journal: a publish or unpublish appends one
// line and fdatasyncs once before it is acknowledged, which keeps the
// kubelet's publish path at a single disk flush. Open replays the journal and
// rewrites it compacted; a torn last line (a crash mid-append) was never
// acknowledged and is dropped.
package records

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/fsutil"
)

// Record is one published volume.
type Record struct {
	VolumeID       string    `json:"volumeID"`
	PodUID         string    `json:"podUID"`
	PodNamespace   string    `json:"podNamespace"`
	PodName        string    `json:"podName"`
	ServiceAccount string    `json:"serviceAccount"`
	TargetPath     string    `json:"targetPath"`
	PublishedAt    time.Time `json:"publishedAt"`
}

func (r Record) validate() error {
	switch {
	case r.TargetPath == "":
		return errors.New("record has no target path")
	case r.PodUID == "":
		return errors.New("record has no pod UID")
	}
	return nil
}

// entry is one journal line.
type entry struct {
	Op     string  `json:"op"` // "put" or "del"
	Record *Record `json:"record,omitempty"`
	Target string  `json:"target,omitempty"`
}

const (
	journalName = "records.log"
	// Compact once the journal holds this many more lines than live records.
	compactSlack = 1024
)

// Store holds the records in memory, backed by the journal in its directory.
type Store struct {
	dir string

	mu       sync.RWMutex
	byTarget map[string]Record
	byPod    map[string]map[string]struct{} // pod UID → targets
	journal  *os.File
	lock     *os.File
	size     int64 // bytes of whole lines in the journal
	lines    int
}

// Open loads the records in dir for reading and writing, creating dir (0700)
// when absent. One process at a time: a second Open of the same dir fails
// while the first holds it. A damaged line other than a torn last one is an
// error: records decide who gets identities, so damage is not ignored.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create records dir: %w", err)
	}
	lock, err := fsutil.Lock(dir)
	if err != nil {
		return nil, fmt.Errorf("records dir: %w", err)
	}
	s := newStore(dir)
	s.lock = lock
	if err := s.replay(filepath.Join(dir, journalName)); err != nil {
		lock.Close()
		return nil, err
	}
	if err := s.compactLocked(); err != nil {
		// A full disk must not keep the node's pods from identities: the
		// journal replayed fine, so serve from it and compact later.
		klog.ErrorS(err, "Compacting the records journal failed; starting on the journal as it is", "path", dir)
		if s.journal == nil {
			if err := s.reopenJournalLocked(); err != nil {
				lock.Close()
				return nil, err
			}
		}
	}
	return s, nil
}

// reopenJournalLocked opens the replayed journal for appending, cut back to
// its last whole line so that a torn tail does not swallow the next one.
func (s *Store) reopenJournalLocked() error {
	f, err := os.OpenFile(filepath.Join(s.dir, journalName), os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open records journal: %w", err)
	}
	fi, err := f.Stat()
	if err == nil && fi.Size() > s.size {
		if err = f.Truncate(s.size); err == nil {
			err = f.Sync()
		}
	}
	if err != nil {
		f.Close()
		return fmt.Errorf("cut back records journal: %w", err)
	}
	s.journal = f
	return nil
}

// Load reads the records in dir without taking or changing anything, for
// inspection while an agent runs.
func Load(dir string) ([]Record, error) {
	s := newStore(dir)
	if err := s.replay(filepath.Join(dir, journalName)); err != nil {
		return nil, err
	}
	return s.All(), nil
}

func newStore(dir string) *Store {
	return &Store{dir: dir, byTarget: map[string]Record{}, byPod: map[string]map[string]struct{}{}}
}

func (s *Store) replay(path string) error {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read records journal: %w", err)
	}
	lines := bytes.SplitAfter(data, []byte("\n"))
	for n, line := range lines {
		last := n == len(lines)-1 || n == len(lines)-2 && len(lines[n+1]) == 0
		if len(line) == 0 {
			continue
		}
		var e entry
		err := json.Unmarshal(bytes.TrimSuffix(line, []byte("\n")), &e)
		if err == nil && !bytes.HasSuffix(line, []byte("\n")) {
			// Acknowledged lines end in a newline: this write was cut short.
			err = errors.New("no newline")
		}
		if err == nil {
			err = s.apply(e)
		}
		switch {
		case err == nil:
			s.size += int64(len(line))
			s.lines++
		case last:
			// The last append never completed (no newline, or a write cut
			// short): it was never acknowledged, so dropping it loses nothing.
			klog.InfoS("Dropped an incomplete last line of the records journal", "journal", path, "line", n+1, "err", err)
		default:
			return fmt.Errorf("records journal %s line %d: %w", path, n+1, err)
		}
	}
	return nil
}

func (s *Store) apply(e entry) error {
	switch e.Op {
	case "put":
		if e.Record == nil {
			return errors.New("put without a record")
		}
		if err := e.Record.validate(); err != nil {
			return err
		}
		s.remove(e.Record.TargetPath)
		s.byTarget[e.Record.TargetPath] = *e.Record
		if s.byPod[e.Record.PodUID] == nil {
			s.byPod[e.Record.PodUID] = map[string]struct{}{}
		}
		s.byPod[e.Record.PodUID][e.Record.TargetPath] = struct{}{}
	case "del":
		if e.Target == "" {
			return errors.New("delete without a target")
		}
		s.remove(e.Target)
	default:
		return fmt.Errorf("unknown op %q", e.Op)
	}
	return nil
}

func (s *Store) remove(target string) {
	old, ok := s.byTarget[target]
	if !ok {
		return
	}
	delete(s.byTarget, target)
	if t := s.byPod[old.PodUID]; t != nil {
		delete(t, target)
		if len(t) == 0 {
			delete(s.byPod, old.PodUID)
		}
	}
}

// compactLocked rewrites the journal with one line per live record, atomically.
func (s *Store) compactLocked() error {
	var buf bytes.Buffer
	for _, r := range s.byTarget {
		r := r
		line, err := json.Marshal(entry{Op: "put", Record: &r})
		if err != nil {
			return fmt.Errorf("encode record: %w", err)
		}
		buf.Write(line)
		buf.WriteByte('\n')
	}
	path := filepath.Join(s.dir, journalName)
	err := fsutil.WriteFileAtomic(path, buf.Bytes(), 0o600)
	if err != nil && (s.journal == nil || s.journalIsAt(path)) {
		// Failed before the rename: the old journal (if any) is still the
		// live one.
		return fmt.Errorf("compact records journal: %w", err)
	}
	// The file at path now holds exactly buf. The old journal is unlinked:
	// appending to it would be durable nowhere. Switch to the new file
	// whatever else failed.
	f, openErr := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o600)
	if s.journal != nil {
		s.journal.Close()
		s.journal = nil
	}
	if openErr != nil {
		// No journal: writes fail until the agent restarts and replays.
		return fmt.Errorf("open records journal: %w", openErr)
	}
	s.journal, s.size, s.lines = f, int64(buf.Len()), len(s.byTarget)
	if err != nil {
		return fmt.Errorf("compact records journal: %w", err)
	}
	return nil
}

// journalIsAt reports whether the open journal is the file at path.
func (s *Store) journalIsAt(path string) bool {
	open, err1 := s.journal.Stat()
	named, err2 := os.Stat(path)
	return err1 == nil && err2 == nil && os.SameFile(open, named)
}

// appendLocked writes one line and flushes it to disk. A failed write is
// cut off again so the journal never holds a partial line before a whole one.
func (s *Store) appendLocked(e entry) error {
	if s.journal == nil {
		return errors.New("records store is closed")
	}
	line, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("encode record: %w", err)
	}
	line = append(line, '\n')
	if _, err := s.journal.Write(line); err != nil {
		s.cutBackLocked()
		return fmt.Errorf("append to records journal: %w", err)
	}
	if err := unix.Fdatasync(int(s.journal.Fd())); err != nil {
		s.cutBackLocked()
		return fmt.Errorf("flush records journal: %w", err)
	}
	s.size += int64(len(line))
	s.lines++
	return nil
}

// cutBackLocked removes a failed append. If even that fails, the store
// stops writing: a later line after a partial one would make the journal
// unreadable at the next start.
func (s *Store) cutBackLocked() {
	if err := s.journal.Truncate(s.size); err != nil {
		klog.ErrorS(err, "Records journal could not be cut back after a failed write; refusing further writes until restart")
		s.journal.Close()
		s.journal = nil
	}
}

// maybeCompactLocked rewrites the journal once it holds far more lines than
// live records. It runs after the operation is applied to memory, which the
// rewrite is made from. A failure is not fatal: the operation's line is
// already durable, and compaction is tried again next time.
func (s *Store) maybeCompactLocked() {
	if s.lines > len(s.byTarget)+compactSlack {
		_ = s.compactLocked()
	}
}

// Put durably stores r, replacing any record for the same target path.
func (s *Store) Put(r Record) error {
	if err := r.validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.appendLocked(entry{Op: "put", Record: &r}); err != nil {
		return fmt.Errorf("store record for %s: %w", r.TargetPath, err)
	}
	if err := s.apply(entry{Op: "put", Record: &r}); err != nil {
		return err
	}
	s.maybeCompactLocked()
	return nil
}

// Delete durably removes the record for target; an absent record is fine.
func (s *Store) Delete(target string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.byTarget[target]; !ok {
		return nil
	}
	if err := s.appendLocked(entry{Op: "del", Target: target}); err != nil {
		return fmt.Errorf("delete record for %s: %w", target, err)
	}
	s.remove(target)
	s.maybeCompactLocked()
	return nil
}

// Close releases the journal.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.journal == nil {
		return nil
	}
	err := s.journal.Close()
	s.journal = nil
	if s.lock != nil {
		s.lock.Close() // releases the flock
		s.lock = nil
	}
	return err
}

// ByTarget returns the record for a target path.
func (s *Store) ByTarget(target string) (Record, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	r, ok := s.byTarget[target]
	return r, ok
}

// ByPodUID returns every record of a pod (a pod may mount the volume twice).
func (s *Store) ByPodUID(uid string) []Record {
	s.mu.RLock()
	defer s.mu.RUnlock()
	targets := s.byPod[uid]
	if len(targets) == 0 {
		return nil
	}
	out := make([]Record, 0, len(targets))
	for t := range targets {
		out = append(out, s.byTarget[t])
	}
	return out
}

// All returns every record.
func (s *Store) All() []Record {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]Record, 0, len(s.byTarget))
	for _, r := range s.byTarget {
		out = append(out, r)
	}
	return out
}
