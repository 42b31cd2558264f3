// Package records keeps the durable record of every CSI publish: which pod
// (UID, namespace, name, service account) got the Workload API socket mounted
// at which target. The Kubernetes attestor cross-checks callers against it.
package records

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

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

// Store holds the records in memory and one file per record in its directory.
// One file per record keeps a publish at a single small atomic write.
type Store struct {
	dir string

	mu       sync.RWMutex
	byTarget map[string]Record
}

const fileSuffix = ".json"

// Open loads every record in dir, creating dir (0700) when absent. A record
// file that cannot be parsed is an error: records decide who gets identities,
// so a damaged store is not silently ignored.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create records dir: %w", err)
	}
	s := &Store{dir: dir, byTarget: map[string]Record{}}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read records dir: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			// Leftover temp file of an interrupted write: the rename never happened.
			_ = os.Remove(filepath.Join(dir, name))
			continue
		}
		if !strings.HasSuffix(name, fileSuffix) {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("read record %s: %w", name, err)
		}
		var r Record
		if err := json.Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("parse record %s: %w", name, err)
		}
		if err := r.validate(); err != nil {
			return nil, fmt.Errorf("record %s: %w", name, err)
		}
		s.byTarget[r.TargetPath] = r
	}
	return s, nil
}

func (s *Store) fileFor(target string) string {
	sum := sha256.Sum256([]byte(target))
	return filepath.Join(s.dir, hex.EncodeToString(sum[:16])+fileSuffix)
}

// Put durably stores r, replacing any record for the same target path.
func (s *Store) Put(r Record) error {
	if err := r.validate(); err != nil {
		return err
	}
	data, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode record: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := fsutil.WriteFileAtomic(s.fileFor(r.TargetPath), data, 0o600); err != nil {
		return fmt.Errorf("store record for %s: %w", r.TargetPath, err)
	}
	s.byTarget[r.TargetPath] = r
	return nil
}

// Delete durably removes the record for target; an absent record is fine.
func (s *Store) Delete(target string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := fsutil.RemoveDurable(s.fileFor(target)); err != nil {
		return fmt.Errorf("delete record for %s: %w", target, err)
	}
	delete(s.byTarget, target)
	return nil
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
	var out []Record
	for _, r := range s.byTarget {
		if r.PodUID == uid {
			out = append(out, r)
		}
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
