// Package records keeps the durable record of every CSI publish: which pod
// (UID, namespace, name, service account) got the Workload API socket mounted
// at which target. The Kubernetes attestor cross-checks callers against it.
//
// Records live in an append-only journal: a publish or unpublish appends one
// line and fdatasyncs once before it is acknowledged, which keeps the
// kubelet's publish path at a single disk flush. Open replays the journal and
// rewrites it compacted; a torn last line (no newline: a crash mid-append)
// was never acknowledged and is dropped. A whole line that does not parse
// may have been acknowledged: the journal is copied aside first and the
// store reports itself damaged (Quarantined), so that nobody treats a mount
// without a record as an orphan.
package records

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
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
	// quarantinePrefix names the copies of damaged journals; while one is in
	// the directory the store is damaged.
	quarantinePrefix = journalName + ".corrupt-"
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
	size     int64 // bytes of whole lines in the journal, damaged ones too
	lines    int
	// bad lists the whole lines of the replayed journal that did not parse.
	bad []badLine
	// quarantined holds the evidence of damage: copies of damaged journals,
	// or the journal itself when it could not be copied.
	quarantined []string
	// keepJournal stops compaction: the journal is the only copy of lines
	// that did not parse.
	keepJournal bool
}

// badLine is a whole journal line that did not parse.
type badLine struct {
	n   int // 1-based
	err error
}

// Open loads the records in dir for reading and writing, creating dir (0700)
// when absent. One process at a time: a second Open of the same dir fails
// while the first holds it.
//
// A whole line that does not parse is not an error: one bad byte must not
// cost every pod on the node its identity. Open copies the journal aside
// (records.log.corrupt-<unix time>), keeps every good record and reports
// the damage through Quarantined, so callers keep what has no record.
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
	data, err := s.replay(filepath.Join(dir, journalName))
	if err != nil {
		lock.Close()
		return nil, err
	}
	if err := s.findQuarantined(); err != nil {
		lock.Close()
		return nil, err
	}
	if len(s.bad) > 0 {
		s.quarantine(data)
	}
	if s.keepJournal {
		if err := s.reopenJournalLocked(); err != nil {
			lock.Close()
			return nil, err
		}
		return s, nil
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

// quarantine copies the damaged journal aside, durably, before anything
// rewrites it. If the copy fails (a full disk), the journal itself is the
// evidence and is never compacted in this process.
func (s *Store) quarantine(data []byte) {
	journal := filepath.Join(s.dir, journalName)
	for _, b := range s.bad {
		klog.ErrorS(b.err, "Records journal line does not parse; quarantining the journal, keeping every mount", "path", journal, "line", b.n)
	}
	path, err := writeQuarantine(s.dir, data, time.Now())
	if err != nil {
		klog.ErrorS(err, "Could not copy the damaged records journal aside; keeping it as it is", "path", journal)
		s.keepJournal = true
		s.quarantined = append(s.quarantined, journal)
		return
	}
	klog.ErrorS(nil, "Quarantined the damaged records journal: records of the damaged lines are lost, their mounts are kept; remove the copy once reviewed", "path", path)
	s.quarantined = append(s.quarantined, path)
}

// writeQuarantine writes data to a new records.log.corrupt-<unix time>[-n]
// (0600), flushed with its directory entry, and returns its path.
func writeQuarantine(dir string, data []byte, now time.Time) (string, error) {
	base := filepath.Join(dir, quarantinePrefix+strconv.FormatInt(now.Unix(), 10))
	for i := 0; i < 100; i++ {
		path := base
		if i > 0 {
			path = base + "-" + strconv.Itoa(i)
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("create quarantine copy: %w", err)
		}
		_, err = f.Write(data)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = fsutil.SyncDir(dir)
		}
		if err != nil {
			_ = os.Remove(path)
			return "", fmt.Errorf("write quarantine copy %s: %w", path, err)
		}
		return path, nil
	}
	return "", fmt.Errorf("quarantine copies %s-* all taken", base)
}

// findQuarantined lists the quarantine copies already in the directory: the
// damage outlives the restart that compacted it away, until an operator has
// reviewed and removed the copy.
func (s *Store) findQuarantined() error {
	found, err := filepath.Glob(filepath.Join(s.dir, quarantinePrefix+"*"))
	if err != nil {
		return fmt.Errorf("list quarantined journals: %w", err)
	}
	sort.Strings(found)
	s.quarantined = append(s.quarantined, found...)
	return nil
}

// Quarantined returns the paths that hold evidence of a damaged journal
// (copies set aside by Open, or the journal itself when it could not be
// copied); empty when the records are whole. While it is not empty, a mount
// without a record may belong to a lost record: keep it.
func (s *Store) Quarantined() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return append([]string(nil), s.quarantined...)
}

// Load reads the records in dir without taking or changing anything, for
// inspection while an agent runs. A whole line that does not parse is an
// error here: Load has no one to report the damage to.
func Load(dir string) ([]Record, error) {
	s := newStore(dir)
	path := filepath.Join(dir, journalName)
	if _, err := s.replay(path); err != nil {
		return nil, err
	}
	if len(s.bad) > 0 {
		return nil, fmt.Errorf("records journal %s line %d: %w", path, s.bad[0].n, s.bad[0].err)
	}
	return s.All(), nil
}

func newStore(dir string) *Store {
	return &Store{dir: dir, byTarget: map[string]Record{}, byPod: map[string]map[string]struct{}{}}
}

// replay applies the journal at path and returns its content. Whole lines
// that do not parse are collected in s.bad; a torn last line is dropped.
func (s *Store) replay(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read records journal: %w", err)
	}
	s.parse(path, data)
	return data, nil
}

// parse applies the journal data read from path.
func (s *Store) parse(path string, data []byte) {
	for n, line := range bytes.SplitAfter(data, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		if !bytes.HasSuffix(line, []byte("\n")) {
			// Only the last line can lack its newline: the append never
			// completed, was never acknowledged, and dropping it loses nothing.
			klog.InfoS("Dropped an incomplete last line of the records journal", "path", path, "line", n+1)
			continue
		}
		s.size += int64(len(line))
		s.lines++
		var e entry
		err := json.Unmarshal(bytes.TrimSuffix(line, []byte("\n")), &e)
		if err == nil {
			err = s.apply(e)
		}
		if err != nil {
			// A whole line may have been acknowledged: it is damage, not a
			// crash, and whatever it recorded must not be taken for absent.
			s.bad = append(s.bad, badLine{n: n + 1, err: err})
		}
	}
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
	if !s.keepJournal && s.lines > len(s.byTarget)+compactSlack {
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
